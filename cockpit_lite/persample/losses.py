"""Per-sample losses l_i from the captured (model output, target) of each micro-batch.

The loss module is re-evaluated with ``reduction="none"`` (a shallow copy; not a second forward of the
model). Its elementwise result is grouped by sample: a result with b rows is summed over its other
axes; one with a multiple of b rows (a language model's ``logits.view(-1, V)``) is taken as b
consecutive blocks (sample-major flattening, as ``view``/``reshape`` of [b, T, ...] gives).

Choice for losses with several elements per sample: l_i is the sample's share of the mini-batch loss,

    sum reduction:  l_i = sum of the sample's elements           (loss = sum_i l_i)
    mean reduction: l_i = (b / N) * sum of the sample's elements (loss = (1/b) sum_i l_i)

with N the normaliser of the mean: the number of elements, or, when the loss divides by something
else (ignore_index, class weights), the N that reproduces the logged loss (sum of elements / loss). With one element per sample this is the
plain per-sample loss. g_i = grad l_i is then consistent with these l_i.
"""

from __future__ import annotations

import copy
import math

import torch


class LossUnavailable(Exception):
    pass


def elementwise_loss(loss_fn, output, target, grad: bool = False) -> torch.Tensor:
    """``loss_fn`` with ``reduction="none"``; differentiable in ``output`` only when ``grad``."""
    if not isinstance(loss_fn, torch.nn.Module) or not hasattr(loss_fn, "reduction"):
        raise LossUnavailable("the loss function has no 'reduction' attribute to evaluate per sample")
    with torch.set_grad_enabled(grad):
        return none_copy(loss_fn)(output, *target)


def per_sample_losses(loss_fn, mb, b: int, reduction: str, bdim: int = 0) -> torch.Tensor:
    """[b] losses of one micro-batch (see the module docstring)."""
    if mb.output is None:
        raise LossUnavailable("the loss inputs of this step were not kept")
    elems = elementwise_loss(loss_fn, mb.output, mb.target if mb.target is not None else ())
    return group_elements(loss_fn, mb, elems, b, reduction, bdim)


def group_elements(loss_fn, mb, elems: torch.Tensor, b: int, reduction: str, bdim: int = 0) -> torch.Tensor:
    """[b] l_i from the elementwise loss ``elems`` of micro-batch ``mb`` (or of its replay: same shapes),
    its elements assigned to samples through the loss input's view of the model output when it is one
    (``output_view.py``), else by rows (``group_by_sample``)."""
    ids = sample_ids(loss_fn, mb, elems, b, bdim)
    if ids is None:
        return group_by_sample(elems, b, reduction, float(mb.loss))
    return _normalised(_sum_by_ids(elems, ids, b), elems, b, reduction, float(mb.loss))


def sample_ids(loss_fn, mb, elems: torch.Tensor, b: int, bdim: int = 0):
    """Sample index of each element of ``elems`` (-1: an element that depends on no sample), or None when
    the loss input is not a view of the model output (rows are then taken as samples). Cached on ``mb``."""
    from .output_view import ViewUnavailable, input_sample_ids, known_sample_ids, probed_sample_ids

    view = getattr(mb, "view", None)
    if view is None:
        return None
    key = (b, bdim, tuple(elems.shape))
    cached = mb.sample_ids
    if cached is not None and cached[0] == key:
        return cached[1]
    if view.kind == "copy":
        raise LossUnavailable(view.copy_reason())
    if view.identity and (bdim >= len(view.out_shape) or view.out_shape[bdim] != b):
        return None  # the model flattened its output itself (rows: b consecutive blocks, by rows)
    if bdim >= len(view.out_shape) or view.out_shape[bdim] != b:
        raise LossUnavailable(f"the model output {tuple(view.out_shape)} does not have the batch's {b} samples "
                              f"along dimension {bdim}")
    try:
        ids = known_sample_ids(loss_fn, view, elems.shape, bdim)
        if ids is None:
            if view.identity and elems.dim() > 0 and elems.shape[0] == b and type(loss_fn).__module__.startswith("torch."):
                return None  # a torch loss on the output itself: rows are samples
            fn = none_copy(loss_fn)
            target = mb.target if mb.target is not None else ()
            ids = probed_sample_ids(fn, mb.output, target, input_sample_ids(view, bdim), b)
    except ViewUnavailable as err:
        raise LossUnavailable(str(err)) from None
    except Exception as err:
        raise LossUnavailable(f"cannot tell which sample each element of the loss belongs to "
                              f"({type(err).__name__}: {err})") from None
    ids = ids.reshape(elems.shape).to(elems.device)
    mb.sample_ids = (key, ids)
    return ids


def none_copy(loss_fn):
    """``loss_fn.forward`` of a shallow copy with ``reduction='none'`` and no hooks (never observed)."""
    fn = copy.copy(loss_fn)
    fn.reduction = "none"
    fn._forward_hooks = type(fn._forward_hooks)()  # the copy must not be observed as a training loss
    fn._forward_pre_hooks = type(fn._forward_pre_hooks)()
    return fn.forward


def _sum_by_ids(elems: torch.Tensor, ids: torch.Tensor, b: int) -> torch.Tensor:
    elems = elems.float() if elems.dtype in (torch.float16, torch.bfloat16) else elems
    live = ids >= 0
    dead = elems.detach()[~live]
    if dead.numel() and bool((dead != 0).any()):
        raise LossUnavailable("a non-zero element of the loss depends on no sample of the model output")
    return torch.zeros(b, dtype=elems.dtype, device=elems.device).index_add(0, ids[live], elems[live])


def group_by_sample(elems: torch.Tensor, b: int, reduction: str, logged: float) -> torch.Tensor:
    """[b] l_i from the elementwise loss of one micro-batch whose logged (reduced) loss is ``logged``
    (differentiable when ``elems`` is)."""
    elems = elems.float() if elems.dtype in (torch.float16, torch.bfloat16) else elems
    if elems.dim() == 0:
        raise LossUnavailable("the loss function returns a scalar even with reduction='none'")
    rows = elems.shape[0]
    if rows % b:
        raise LossUnavailable(f"the loss has {rows} rows, which cannot be split into the batch's {b} samples")
    per = elems.reshape(b, -1).sum(1)  # b rows, or b consecutive blocks of rows (sample-major flattening)
    return _normalised(per, elems, b, reduction, logged)


def mean_factor(elems: torch.Tensor, b: int, reduction: str, logged: float) -> float:
    """The factor taking a sample's sum of loss elements to its l_i: 1 (sum) or b / N (mean)."""
    one = torch.ones((), dtype=torch.float64)
    return float(_normalised(one, elems, b, reduction, logged))


def _normalised(per: torch.Tensor, elems: torch.Tensor, b: int, reduction: str, logged: float) -> torch.Tensor:
    if reduction == "sum":
        return per
    if reduction == "mean":
        # the normaliser N of the mean: the number of elements, unless the loss divides by something else
        # (ignored targets, class weights); then N = (sum of elements) / (logged loss)
        N = float(elems.numel())
        total = float(elems.detach().double().sum())
        if logged != 0.0 and math.isfinite(logged) and math.isfinite(total):
            estimate = total / logged
            if estimate > 0 and abs(estimate - N) > 1e-4 * N:
                N = estimate
        return per * (b / N)
    raise LossUnavailable(f"loss reduction {reduction!r} is neither 'mean' nor 'sum'")
