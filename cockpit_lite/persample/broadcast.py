"""Per-sample output gradients of a layer called without the batch dimension and added to a batch.

A position embedding on ``arange(T)`` or ``position_ids`` of shape [1, T] (GPT-2's ``wpe``, BERT's
``position_embeddings``, a learned table in a hand-written transformer) returns [T, d] or [1, T, d], which
an addition broadcasts over the batch: ``h = tok_emb(x) + pos_emb(pos)``. The gradient arriving at its output
is summed over the samples, but the gradient arriving at the sum ``h`` ([B, T, d]) is per sample, and
d h / d pos_emb(pos) is the identity for every sample. So when the layer's output has exactly one consumer in
the forward's autograd graph and that consumer is a plain addition (``AddBackward0``, alpha 1) whose result
has the batch dimension, the layer's call is treated as a call on the batch: its inputs expanded to B rows
(views, no copy) and its output gradient read at the addition (a hook on that node) instead of at the
output. The per-sample gradients are then the layer rule's, exact, with no replay of the model.

Anything else (two consumers, a scaling or dropout before the addition, a concatenation) is left as it was
(the per-sample replay of ``replayed.py``, or NaN with the reason).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves

MAX_NODES = 200_000  # the walk over the forward's graph stops here (a model this large keeps the old path)


def _roots(output) -> List[Any]:
    """The autograd nodes of the tensors in the model's output (dicts such as Hugging Face's outputs too)."""
    if isinstance(output, dict):
        output = list(output.values())
    return [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def _consumers(roots) -> Optional[Dict[int, list]]:
    """{id(node): [consumer node, ...]} over the graph below ``roots``; None if it is too large."""
    parents: Dict[int, list] = {}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            return None
        for nxt, _ in node.next_functions:
            if nxt is not None:
                parents.setdefault(id(nxt), []).append(node)
                stack.append(nxt)
    return parents


SHAPE_OPS = ("PermuteBackward0", "UnsqueezeBackward0", "TransposeBackward0", "CloneBackward0")


def _route(parents: Dict[int, list], node, shape: Tuple[int, ...]):
    """(the addition, the shape ops on the way [(name, args)], the shape entering the addition) where ``node``'s
    output reaches a plain addition through single-use permute / unsqueeze / transpose / clone only (T5's
    relative attention bias: [T, S, H] -> permute(2, 0, 1) -> unsqueeze(0) -> clone -> + mask), else None."""
    ops = []
    for _ in range(8):
        uses = parents.get(id(node), [])
        if len(uses) != 1:
            return None
        nxt = uses[0]
        name = nxt.name()
        if name == "AddBackward0":
            return (nxt, ops, shape) if getattr(nxt, "_saved_alpha", 1) == 1 else None
        if name not in SHAPE_OPS:
            return None
        if name == "CloneBackward0":
            pass  # the identity on values
        elif name == "PermuteBackward0":
            dims = tuple(d % len(shape) for d in nxt._saved_dims)
            ops.append(("permute", dims))
            shape = tuple(shape[d] for d in dims)
        elif name == "UnsqueezeBackward0":
            d = nxt._saved_dim % (len(shape) + 1)
            ops.append(("unsqueeze", d))
            shape = shape[:d] + (1,) + shape[d:]
        else:
            d0, d1 = sorted((nxt._saved_dim0 % len(shape), nxt._saved_dim1 % len(shape)))
            ops.append(("transpose", (d0, d1)))
            shape = shape[:d0] + (shape[d1],) + shape[d0 + 1:d1] + (shape[d0],) + shape[d1 + 1:]
        node = nxt
    return None


def _routes(todo: list, output, batch: int):
    """(call, output, ``_route``) for each (call, output) of ``todo`` whose output reaches a plain addition as its
    only use; one walk over the forward's graph, none where ``todo`` is empty or the batch is a single sample."""
    if not todo or batch < 2:
        return
    parents = _consumers(_roots(output))
    if parents is None:
        return
    for call, out in todo:
        route = _route(parents, out.grad_fn, tuple(out.shape))
        if route is not None:
            yield call, out, route


def attach(pending: list, output, batch: int) -> None:
    """For each (call, output tensor) of ``pending`` whose output lacks the batch dimension of size ``batch``:
    where it reaches a broadcasting addition as its only use (through shape ops at most), read its per-sample
    output gradient there in backward (``LayerCall.broadcast_grad``; ``taken`` then expands the call's inputs
    to the batch)."""
    todo = [(c, out) for c, out in pending if _lacks_batch(out, batch) and out.grad_fn is not None
            # an input with the batch (or a tensor keyword): the output is not a batch-free table
            and not any(isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch for a in c.inputs)
            and not any(isinstance(v, torch.Tensor) for v in tree_leaves(c.kwargs))]
    for call, out, (node, ops, shape) in _routes(todo, output, batch):
        lead = out.shape[0] != 1  # [T, d]: no batch dimension at all (else [1, T, d])
        call.broadcast = (batch, tuple(out.shape), lead)
        node.register_prehook(_reader(call, ops, shape))


def mark_ambiguous(pending: list, output, batch: int) -> None:
    """Marks (``LayerCall.ambiguous``, the reason) each call of ``pending`` whose output has ``batch`` rows but
    reaches a plain addition as its only use (through shape ops at most) with its dim 0 broadcast onto another
    dim of a result whose dim 0 also has ``batch`` entries: ``pos(arange(T))`` [T, d] added to [B, T, d] token
    embeddings when T == B. Its rows are then positions in a batch-first model, or samples in a sequence-first
    one (a per-sample [B, d] vector added to [T, B, d]): nothing in the shapes tells which, and the sums over
    the rows are .grad either way, so no check of them can (``view_setup`` leaves it to the per-sample replay,
    or NaN with this reason). Only calls of lower rank than the forward's largest output are looked at: one
    walk over the forward's graph, and none where every layer output has the same rank (an MLP)."""
    top = max((out.dim() for _, out in pending), default=0)
    todo = [(c, out) for c, out in pending if 1 <= out.dim() < top and out.shape[0] == batch
            and out.grad_fn is not None and not c.broadcast]
    for call, out, (node, ops, shape) in _routes(todo, output, batch):
        try:
            result = tuple(node._input_metadata[0].shape)
        except (AttributeError, IndexError, RuntimeError):
            continue
        at = _where_rows_go(ops) + len(result) - len(shape)  # broadcasting aligns trailing dims
        if at != 0 and len(result) > at and result[0] == batch and result[at] == batch:
            call.ambiguous = (
                f"its module ('{call.module_name}') returned {list(out.shape)}, which is added to a "
                f"{list(result)} tensor with its dim 0 on that tensor's dim {at}: with {batch} entries in both, its "
                "rows are positions broadcast over the batch (a position table on arange(T) with T equal to the "
                "batch size) or samples in a sequence-first layout, and the sums over them are .grad either way; "
                "call it with arange(T).expand(B, -1) to make the rows samples")


def _where_rows_go(ops) -> int:
    """The dim that the layer output's dim 0 becomes after the shape ops of ``_route``."""
    at = 0
    for name, arg in ops:
        if name == "unsqueeze":
            at += 1 if arg <= at else 0
        elif name == "permute":
            at = list(arg).index(at)
        else:
            d0, d1 = arg
            at = d1 if at == d0 else d0 if at == d1 else at
    return at


def taken(call, grad: torch.Tensor) -> torch.Tensor:
    """The output gradient to keep for ``call``: the per-sample one read at the addition (its inputs then
    expanded to the batch, once), else ``grad`` as it arrived."""
    g = getattr(call, "broadcast_grad", None)
    if g is None:
        return grad
    call.broadcast_grad = None
    batch, _, lead = call.broadcast
    if not getattr(call, "expanded", False):
        call.inputs = tuple(_expanded(a, batch, lead) for a in call.inputs)
        call.expanded = True
    return g


def _lacks_batch(out: torch.Tensor, batch: int) -> bool:
    return out.dim() >= 1 and (out.shape[0] == 1 or out.shape[0] != batch)


def _expanded(a, batch: int, lead: bool):
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return a
    if lead:
        return a.unsqueeze(0).expand(batch, *a.shape)
    if a.shape[0] == 1:
        return a.expand(batch, *a.shape[1:])
    return a


def _reader(call, ops, shape):
    def read(grad_outputs):
        g = grad_outputs[0] if grad_outputs else None
        batch, out_shape, lead = call.broadcast
        if g is None or g.dim() < 1 or g.shape[0] != batch:
            return None
        try:
            per = _undone(g.detach(), ops, shape, batch)
        except (RuntimeError, ValueError):
            return None
        want = (batch, *out_shape) if lead else (batch, *out_shape[1:])
        if per is not None and tuple(per.shape) == want:
            call.broadcast_grad = per
        return None

    return read


def _undone(g: torch.Tensor, ops, shape: Tuple[int, ...], batch: int) -> Optional[torch.Tensor]:
    """The per-sample gradient of the layer's output from the gradient ``g`` of the addition's result: ``shape``
    is the layer output's shape after ``ops``, broadcast to g's shape. The batch is g's dim 0: the size-1 dim 0
    of ``shape`` (``at`` = 0), or a dim in front of it (``at`` = None); the ops are undone in reverse order."""
    if len(shape) == g.dim() and shape[0] == 1 and tuple(g.shape[1:]) == tuple(shape[1:]):
        at = 0
    elif len(shape) == g.dim() - 1 and tuple(g.shape[1:]) == tuple(shape):
        at = None
    else:
        return None
    off = 0 if at is not None else 1  # g's dims of the (virtual) shape start here
    for name, arg in reversed(ops):
        if name == "unsqueeze":
            if at == arg:  # the dim the batch broadcasts into: the batch now stands in front
                at, off = None, 1
            else:
                g = g.squeeze(arg + off)
                if at is not None and arg < at:
                    at -= 1
        elif name == "permute":
            inv = sorted(range(len(arg)), key=lambda k: arg[k])
            g = g.permute(*range(off), *[k + off for k in inv]) if off else g.permute(*inv)
            if at is not None:
                at = arg[at]
        else:
            d0, d1 = arg
            g = g.transpose(d0 + off, d1 + off)
            if at is not None and at in (d0, d1):
                at = d1 if at == d0 else d0
    if at not in (None, 0):
        return None
    return g.contiguous()
