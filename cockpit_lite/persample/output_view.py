"""The loss input as a view of the model output: which sample each loss element belongs to, and the replay.

A language model's loop reads the loss input L from the model output O by a view,
``crit(logits.view(-1, V), y.view(-1))``, ``logits.flatten(0, 1)``, ``logits.transpose(1, 2)``. L then
shares O's storage, and its size, stride and storage offset say exactly where each element of L sits in
O, hence which sample it belongs to (its coordinate along O's batch dimension). :func:`describe` keeps
those numbers (``OutputView``) when the loss is called; they serve twice:

* per-sample losses (``losses.py``): each element of the elementwise loss (``reduction="none"``) is
  assigned to its sample: for the torch losses whose elements are known (cross-entropy / NLL: L without
  its class dimension 1; elementwise losses: L itself) from the positions directly; for any other loss
  module by two forward-mode probes of the loss (:func:`probed_sample_ids`), which also prove that no loss
  element mixes samples;
* replays (curvature, the per-sample self-check, ``curvature/batch_loss.py``): the same view is applied
  to the re-evaluated model output (:func:`replay`), for a sub-batch too when the view is a reshape or a
  permutation of the output.

A loss input that is not a view of the model output (a copy: ``.contiguous()`` after a transpose, ``.float()``)
has no ``OutputView``: its rows are the samples when there are as many as the batch has, otherwise the
per-sample losses say why they are unavailable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from ..autograd_walk import Upstream


class ViewUnavailable(Exception):
    """The loss elements cannot be assigned to samples (message = reason)."""


@dataclass(frozen=True)
class OutputView:
    """L = O.as_strided(size, stride, O.storage_offset() + offset), O of shape ``out_shape`` / ``out_stride``."""

    out_shape: Tuple[int, ...]
    out_stride: Tuple[int, ...]
    size: Tuple[int, ...]
    stride: Tuple[int, ...]
    offset: int
    kind: str  # "identity" | "reshape" (of a contiguous O) | "permute" | "strided"
    perm: Optional[Tuple[int, ...]] = None

    @property
    def identity(self) -> bool:
        return self.kind in ("identity", "cast")

    def copy_reason(self) -> str:
        return (f"the loss input {tuple(self.size)} is a copy of the model output {tuple(self.out_shape)} in another "
                "layout (e.g. .contiguous() or .reshape of a transposed tensor): which sample each loss element belongs "
                "to cannot be established; pass the model output or a view of it (e.g. logits.view(-1, V))")


def _contiguous_strides(shape: Sequence[int]) -> Tuple[int, ...]:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= max(int(s), 1)
    return tuple(reversed(out))


def _same_strides(shape, a, b) -> bool:
    return all(s <= 1 or x == y for s, x, y in zip(shape, a, b))


def describe(output, loss_input) -> Optional[OutputView]:
    """The view that reads ``loss_input`` from ``output``, or None when it is not one (a copy, another tensor)."""
    if not (isinstance(output, torch.Tensor) and isinstance(loss_input, torch.Tensor)):
        return None
    if output.dim() == 0:
        return None
    if output.dtype != loss_input.dtype or output.device != loss_input.device:  # out.float() under autocast
        return _copy_of(output, loss_input)
    try:
        same = output.untyped_storage().data_ptr() == loss_input.untyped_storage().data_ptr()
    except Exception:  # tensors without storage (functional tensors, ...)
        return None
    if not same:
        return _copy_of(output, loss_input)
    shape, stride = tuple(output.shape), tuple(output.stride())
    size, lstride = tuple(loss_input.shape), tuple(loss_input.stride())
    offset = loss_input.storage_offset() - output.storage_offset()
    if offset == 0 and size == shape and _same_strides(shape, lstride, stride):
        kind, perm = "identity", None
    elif (offset == 0 and math.prod(size) == math.prod(shape) and _same_strides(shape, stride, _contiguous_strides(shape))
          and _same_strides(size, lstride, _contiguous_strides(size))):
        kind, perm = "reshape", None
    else:
        perm = _permutation(shape, stride, size, lstride) if offset == 0 else None
        kind = "permute" if perm is not None else "strided"
    return OutputView(shape, stride, size, lstride, offset, kind, perm)


_RESHAPES = ("ViewBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2")


def _reshaped(loss_input) -> Optional[OutputView]:
    """A "reshape" view of the tensor that ``loss_input`` was made from by ``view``/``reshape``/``flatten``/
    ``squeeze`` (one such autograd node, its input's shape saved on it), or None."""
    node = getattr(loss_input, "grad_fn", None) if isinstance(loss_input, torch.Tensor) else None
    if node is None or type(node).__name__ not in _RESHAPES or not loss_input.is_contiguous():
        return None
    try:
        shape = tuple(int(s) for s in node._saved_self_sym_sizes)
    except Exception:
        return None
    size = tuple(loss_input.shape)
    if not shape or math.prod(shape) != math.prod(size) or shape == size:
        return None
    if _layer_unflatten(node, shape, size):
        return None
    return OutputView(shape, _contiguous_strides(shape), size, _contiguous_strides(size), 0, "reshape")


_PRODUCT_NODES = ("AddmmBackward0", "MmBackward0")


def _layer_unflatten(node, shape, size) -> bool:
    """Whether the reshape is a layer's own: ``F.linear`` with a bias on a [B, T, in] input computes ``addmm`` on
    its [B*T, in] rows and views the result back to [B, T, out]. That view splits dim 0 of a matrix product; the
    loss input's own dim 0 is then the batch, not the product's B*T rows (was: per-sample losses and the
    self-check unavailable for Phi, GPT-J, CodeGen heads and a biased head whose loss is computed in forward)."""
    k = len(size) - len(shape) + 1
    if k < 2 or tuple(size[k:]) != tuple(shape[1:]) or math.prod(size[:k]) != shape[0]:
        return False
    source = next((f for f, _ in node.next_functions if f is not None), None)
    return type(source).__name__ in _PRODUCT_NODES


_COPY_NODES = ("Clone", "View", "UnsafeView", "Transpose", "Permute", "ToCopy", "ReshapeAlias", "Slice", "Select",
               "Squeeze", "Unsqueeze", "AsStrided", "Alias", "Contiguous", "Flatten", "Unflatten")


def _copy_of(output: torch.Tensor, loss_input: torch.Tensor) -> Optional[OutputView]:
    """A loss input made from the output by copies of views (``.contiguous()``, ``.float()``, ``.reshape`` of a
    transposed tensor): kind "cast" when it keeps the output's shape (a dtype cast), else "copy" (which sample
    each element belongs to is then unknown). None when it is computed otherwise (or not from the output)."""
    target, node = output.grad_fn, loss_input.grad_fn
    if target is None or node is None:
        return None
    for _ in range(16):
        if node is target:
            shape = tuple(output.shape)
            kind = "cast" if tuple(loss_input.shape) == shape else "copy"
            return OutputView(shape, _contiguous_strides(shape), tuple(loss_input.shape),
                              _contiguous_strides(loss_input.shape), 0, kind)
        name = type(node).__name__
        if node is None or not any(name.startswith(k + "Backward") for k in _COPY_NODES):
            return None
        nxt = [f for f, _ in node.next_functions if f is not None]
        if len(nxt) != 1:
            return None
        node = nxt[0]
    return None


def _permutation(shape, stride, size, lstride) -> Optional[Tuple[int, ...]]:
    if len(size) != len(shape):
        return None
    perm, used = [], set()
    for s, st in zip(size, lstride):
        k = next((d for d in range(len(shape)) if d not in used and shape[d] == s and (s <= 1 or stride[d] == st)), None)
        if k is None:
            return None
        used.add(k)
        perm.append(k)
    return tuple(perm)


def replay(view: Optional[OutputView], out: torch.Tensor, batch: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The loss input read from a re-evaluated model output ``out`` as ``view`` read it in training.

    ``batch = (b, m)``: ``out`` holds the first m of the b samples along dim 0 (a sub-batch replay)."""
    if view is None or view.identity:
        return out
    if view.kind == "copy":
        raise ViewUnavailable(view.copy_reason())
    if view.kind == "permute":
        return out.permute(*view.perm)
    if view.kind == "reshape":
        if batch is None:
            if out.numel() != math.prod(view.size):
                raise ViewUnavailable(f"the loss input {tuple(view.size)} is not a reshape of the re-evaluated model "
                                      f"output {tuple(out.shape)} (a copy of a part of it, e.g. logits[:, :-1]"
                                      ".contiguous(), written inline): the loss cannot be re-evaluated from the model")
            return out.reshape(view.size)
        b, m = batch
        if not view.size or view.size[0] % b:
            raise ViewUnavailable(f"the loss input {tuple(view.size)} is not a batch-major reshape of the model "
                                  f"output {tuple(view.out_shape)}: a sub-batch cannot be replayed")
        size = (view.size[0] // b * m, *view.size[1:])
        if out.numel() != math.prod(size):
            raise ViewUnavailable(f"the loss input {tuple(view.size)} is not a reshape of the model output "
                                  f"{tuple(view.out_shape)}: a sub-batch cannot be replayed")
        return out.reshape(size)
    if batch is not None or tuple(out.shape) != view.out_shape or not _same_strides(view.out_shape, tuple(out.stride()),
                                                                                       view.out_stride):
        raise ViewUnavailable(f"the loss input is a strided view {tuple(view.size)} of the model output "
                              f"{view.out_shape} that the re-evaluated output ({tuple(out.shape)}) cannot reproduce")
    return out.as_strided(view.size, view.stride, out.storage_offset() + view.offset)


def head_target(view: Optional[OutputView], t, b: int, m: int):
    """The first m samples' part of a loss target (its rows follow the loss input's rows)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if t.shape[0] == b:
        return t[:m]
    if view is not None and view.kind == "reshape" and view.size and t.shape[0] == view.size[0] and t.shape[0] % b == 0:
        return t[: t.shape[0] // b * m]
    return t


# -- which sample each element belongs to -------------------------------------------------------------------------
def _unravel_dim(view: OutputView, positions: torch.Tensor, bdim: int) -> torch.Tensor:
    """Coordinate along O's dim ``bdim`` of storage positions (relative to O's offset) in a dense O."""
    dims = sorted((d for d in range(len(view.out_shape)) if view.out_shape[d] > 1),
                  key=lambda d: -view.out_stride[d])
    acc = 1
    for d in reversed(dims):  # dense (no gaps, no overlap) in this order
        if view.out_stride[d] != acc:
            raise ViewUnavailable(f"the model output {view.out_shape} with strides {view.out_stride} is not dense")
        acc *= view.out_shape[d]
    if view.out_shape[bdim] <= 1:
        return torch.zeros_like(positions)
    return (positions // view.out_stride[bdim]) % view.out_shape[bdim]


def _positions(view: OutputView, shape_of: Sequence[Optional[int]]) -> torch.Tensor:
    """Storage positions of the loss-input elements at the grid ``shape_of`` (an int: that fixed index)."""
    p = torch.tensor(view.offset, dtype=torch.int64)
    nd = len(view.size)
    for k, (n, st) in enumerate(zip(view.size, view.stride)):
        fixed = shape_of[k]
        if fixed is not None:
            p = p + int(fixed) * st
            continue
        shape = [1] * nd
        shape[k] = n
        p = p + torch.arange(n, dtype=torch.int64).view(shape) * st
    return p


def input_sample_ids(view: OutputView, bdim: int) -> torch.Tensor:
    """[*L.shape] sample index of every element of the loss input (int64; use for small inputs)."""
    return _unravel_dim(view, _positions(view, [None] * len(view.size)).expand(view.size), bdim)


def row_sample_ids(view: OutputView, bdim: int) -> torch.Tensor:
    """[L.shape[0]] sample index of each row of the loss input (its first element's)."""
    return _unravel_dim(view, _positions(view, [None] + [0] * (len(view.size) - 1)), bdim).reshape(-1)


_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)
_ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss,
                       nn.KLDivLoss, nn.SoftMarginLoss, nn.PoissonNLLLoss, nn.GaussianNLLLoss)


def known_sample_ids(loss_fn, view: OutputView, elems_shape, bdim: int) -> Optional[torch.Tensor]:
    """Sample index of each loss element for the torch losses whose elements are known, else None."""
    if view.kind == "copy":
        raise ViewUnavailable(view.copy_reason())
    size = view.size
    if type(loss_fn) in _CLASS_LOSSES and len(size) >= 2 and tuple(elems_shape) == size[:1] + size[2:]:
        grid = [None] * len(size)
        grid[1] = 0
        ids = _unravel_dim(view, _positions(view, grid), bdim).reshape(elems_shape)
        grid[1] = size[1] - 1
        if not torch.equal(ids, _unravel_dim(view, _positions(view, grid), bdim).reshape(elems_shape)):
            raise ViewUnavailable("the class dimension of the loss input runs across samples of the model output")
        return ids
    if type(loss_fn) in _CLASS_LOSSES and len(size) == 1 and len(elems_shape) == 0:
        return None
    if type(loss_fn) in _ELEMENTWISE_LOSSES and tuple(elems_shape) == size:
        return input_sample_ids(view, bdim)
    return None


def probed_sample_ids(fn, loss_input: torch.Tensor, target, input_ids: torch.Tensor, b: int) -> torch.Tensor:
    """Sample index of each element of ``fn(loss_input, *target)`` (elementwise), from two forward-mode
    probes: with tangents r and c[ids] * r (r random, c_i = i + 1), an element that depends on sample i
    alone has the ratio c_i exactly; any other ratio means the element mixes samples. Elements that
    depend on nothing (ignored targets) get -1."""
    try:  # float64 where the loss allows it (class weights stored in float32 may refuse)
        return _probe(fn, loss_input.detach().double(), target, input_ids, b, 1e-6)
    except ViewUnavailable:
        raise
    except Exception:
        return _probe(fn, loss_input.detach().float(), target, input_ids, b, 1e-2)


def _probe(fn, x, target, input_ids, b, tol):
    from torch.func import jvp

    gen = torch.Generator(device="cpu").manual_seed(0)
    r = torch.rand(x.shape, generator=gen, dtype=torch.float64).add_(0.5).to(device=x.device, dtype=x.dtype)
    c = (input_ids.to(x.device) + 1).to(x.dtype)
    f = lambda z: fn(z, *target)
    e1 = jvp(f, (x,), (r,))[1]
    e2 = jvp(f, (x,), (r * c,))[1]
    scale = float(e1.abs().max()) if e1.numel() else 0.0
    live = e1.abs() > 1e-7 * scale
    ratio = torch.where(live, e2 / torch.where(live, e1, torch.ones_like(e1)), torch.zeros_like(e1))
    ids = ratio.round()
    if bool(((ratio - ids).abs() > tol * b)[live].any()) or bool(((ids < 1) | (ids > b))[live].any()):
        raise ViewUnavailable("an element of the loss depends on several samples (checked by forward-mode probes)")
    return torch.where(live, ids.long() - 1, torch.full_like(ids, -1, dtype=torch.long))


_PRODUCTS = ("MmBackward0", "CdistBackward0")  # 2-D products: rows of one operand meet every row of the other


def coupling(output, loss_input, budget: int = 256) -> Optional[str]:
    """A reason when the loss input multiplies two tensors both computed from the model output (``z @ z.T / tau``
    of a contrastive loss, ``torch.cdist(z, z)``): every row of it then depends on every sample, and the layer
    rules' split by the output's rows is not the gradient of any sample's loss. None otherwise, or when the
    autograd graph between the two is larger than ``budget`` nodes (not examined)."""
    target = getattr(output, "grad_fn", None)
    start = getattr(loss_input, "grad_fn", None) if isinstance(loss_input, torch.Tensor) else None
    if target is None or start is None:
        return None
    order, stack, seen = [], [start], {start}
    while stack:  # the nodes between the loss input and the output (iterative, bounded)
        node = stack.pop()
        order.append(node)
        if len(order) > budget:
            return None
        if node is target:
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)

    reach = {target}  # the nodes that lead to the output, by a fixed point over the (few) nodes seen
    grown = True
    while grown:
        grown = False
        for node in order:
            if node not in reach and any(f in reach for f, _ in node.next_functions if f is not None):
                reach.add(node)
                grown = True
    for node in order:
        name = type(node).__name__
        if name in _PRODUCTS and sum(f in reach for f, _ in node.next_functions if f is not None) >= 2:
            return (f"the loss input is a product of two tensors computed from the model output ({name[:-9]}: e.g. "
                    "z @ z.T of a contrastive loss): every row of it depends on every sample, the samples are coupled "
                    "in the loss and have no per-sample gradients")
    return None


def observe(mb, output, loss_input) -> None:
    """At a loss call: keep how its input was read from the model output (``mb.view``); the samples of the
    micro-batch are then the model output's rows, not the loss input's (B sequences, not B*T tokens).

    The engine holds the output until the loss call. Where the loss input is neither a view nor a copy of
    it (``(logits / T).view(-1, V)``), or no output was seen (``output`` None), the shape of what the loss
    input reshaped is read from its autograd node (``_reshaped``); whether that tensor was computed from the
    model output sample by sample is not known here: every replay of it (curvature, self-check, per-sample
    replay) is trusted only where it reproduces the step's loss or per-sample losses."""
    view = describe(output, loss_input) if output is not None else None
    if view is None:
        mb.coupled = coupling(output, loss_input) if output is not None else None
        if output is not None and isinstance(loss_input, torch.Tensor):
            mb.replay = computed_reason(output, loss_input)
        mb.view = view = _reshaped(loss_input)
        if view is not None:
            mb.batch_size = int(view.out_shape[0])
        return
    mb.view = view
    if view.out_shape and not view.identity:
        mb.batch_size = int(view.out_shape[0])


def computed_reason(output: torch.Tensor, loss_input: torch.Tensor, budget: int = 64) -> str:
    """Why a loss input that is neither the model output (its first tensor) nor a view or copy of it cannot be
    re-evaluated: every replay (curvature, the per-sample self-check and replay) feeds loss_fn the re-evaluated
    output, so a temperature, clamp or activation applied to it in the loop would be left out, and another output
    tensor would not be the one read. A check of the re-evaluated loss's value cannot tell: a clamp inactive on
    this batch, or a temperature near 1, gives the same loss and other derivatives."""
    node, target = getattr(loss_input, "grad_fn", None), getattr(output, "grad_fn", None)
    if target is not None and any(n is target for n in Upstream([node], budget)):  # the output, a few nodes up
        op = _last_computation(node, target)
        return (f"the loss input is computed from the model output in the loop (its last operation: {op}): "
                "loss_fn applied to the re-evaluated model output would leave that computation out; do it "
                "inside the model's forward (or inside the loss module) to have the step re-evaluated")
    return ("the loss input is neither the model output's first tensor nor a view or copy of it (another output "
            "tensor, or a tensor made elsewhere): a re-evaluation of the step feeds loss_fn the first tensor; return "
            "the loss input first, or compute the loss inside forward")


_NOT_COMPUTING = ("View", "Reshape", "UnsafeView", "Transpose", "Permute", "Squeeze", "Unsqueeze", "Slice", "Select",
             "Expand", "Clone", "ToCopy", "Alias", "T")


def _last_computation(node, target) -> str:
    """The name of the last operation on the way from the model output to the loss input that is not a reshape,
    a slice or a copy (``(out / 2).view(-1, V)``: Div, not View)."""
    first = name = type(node).__name__.removesuffix("Backward0").removesuffix("Backward1")
    for _ in range(16):
        if name not in _NOT_COMPUTING or node is target:
            return name if node is not target else first
        nxt = [n for n, _ in node.next_functions if n is not None]
        if len(nxt) != 1:
            return name
        node = nxt[0]
        name = type(node).__name__.removesuffix("Backward0").removesuffix("Backward1")
    return first


def depends_on(tensors, param_ids, budget: int = 4096) -> bool:
    """Whether any of ``tensors`` is computed from a parameter whose id is in ``param_ids`` (its autograd graph
    reaches that parameter's accumulator), within ``budget`` nodes; beyond it, True (not established). A target
    that requires grad without depending on them (an input with requires_grad, an unwatched teacher) is False."""
    graded = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
    if any(t.grad_fn is None and id(t) in param_ids for t in graded):  # a leaf: itself a watched parameter
        return True
    walk = Upstream([t.grad_fn for t in graded], budget)
    # a parameter's accumulator holds it as ``variable``
    return any(id(getattr(n, "variable", None)) in param_ids for n in walk) or walk.truncated


def target_reason(k: int) -> str:
    """Why a loss whose argument ``k`` (after the input) is computed with gradients cannot be re-evaluated: the
    replays keep the step's arguments as constants (GaussianNLLLoss's var, a triplet's positive computed by the
    model would then be held fixed, and the curvature would be that of another function)."""
    return (f"argument {k} of loss_fn is computed with gradients (from the model, e.g. GaussianNLLLoss's var or "
            "a triplet's positive and negative): a re-evaluation of the step would hold it constant; detach it if "
            "it is a constant target")


def first_tensor(output):
    """The model output's first tensor (the loss input may be a view or a copy of it); None if it has none."""
    return output if isinstance(output, torch.Tensor) else next(
        (x for x in tree_leaves(output) if isinstance(x, torch.Tensor)), None)
