"""A loss module returning one loss per element (``reduction="none"``): how the loop combined them.

The loop reduces the elements itself (``crit(out, y).mean()``, a masked mean, per-sample weights, a
focal transform, the k hardest samples). The logged ``loss`` and the curvature (which re-evaluates the
loss module) take the mean of the elements; that is the loop's loss only when every element entered
the back-propagated loss with the same weight. The gradient that reaches the elements in backward
says which weights they had (``d root / d l_i``):

* all equal: the loop's loss is c * mean(l) with c = d root / d mean(l). c <= 1 (``.mean()``, divided by
  the number of accumulated micro-batches): a mean-reduced loss, the mean is logged and the curvature is
  its curvature. c > 1 (``.sum()``: c = n; a loss scaled up): the per-sample quantities (free of the scale)
  are a mean-reduced loss's, but ``loss`` and the curvature are NaN with the reason (``SCALED``): whether the
  loop trained on the sum or on a scaled mean is not known (curvature would be n times off);
* equal where not zero (a masked mean over real tokens, the top-k samples' mean): the mean over the
  elements that count is logged; the curvature, which would re-evaluate all of them, is NaN with why;
* otherwise (per-sample weights, focal loss, any non-linear transform): no value is the loop's loss
  for certain; ``loss`` and the curvature are NaN with the reason.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

RTOL = 1e-5  # equal weights: within float32 rounding of one division

WEIGHTED = ("loss_fn returns one loss per element (reduction='none') and the loop combined them with unequal "
            "weights (per-sample weights, a focal or other non-linear transform): the mean of the elements "
            "is not the loss that was back-propagated")
SCALED = ("loss_fn returns one loss per element (reduction='none') and the loop weighed them equally by {c:.4g} / n "
          "(their sum, or a scaled mean): the scale of the loss trained on is not known, so neither its value nor its "
          "curvature; the per-sample quantities do not depend on it")
MASKED = ("loss_fn returns one loss per element (reduction='none') and the loop's loss leaves some of them out "
          "(a masked mean, the k hardest samples): re-evaluating loss_fn would count every element")


def combined(elements: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, Optional[str], torch.Tensor]:
    """(the loss to log, why re-evaluating loss_fn's mean would not be the loop's loss or None, the backward
    scale) for the detached ``elements`` a loss call returned and the gradient ``grad`` they received in
    backward. The scale is d root / d mean(l) where the elements weigh the same (as for a mean-reduced loss),
    else ``grad`` itself."""
    w = grad.detach().reshape(-1)
    if w.numel() != elements.numel():
        return elements.mean(), None, grad
    if not w.numel():  # an empty batch: its mean is 0/0 as for a mean-reduced loss, and no scale reaches it
        return elements.mean(), None, w.new_zeros(())
    w0 = w[0]
    if bool((w - w0).abs().le(RTOL * w0.abs()).all()):
        return elements.mean(), None, w0 * w.numel()  # (a scale above 1: see scaled())
    counts = w.ne(0)
    if bool(counts.any()):
        nz = w[counts]
        if bool((nz - nz[0]).abs().le(RTOL * nz[0].abs()).all()):
            return elements.reshape(-1)[counts].mean(), MASKED, grad
    return torch.full((), float("nan"), dtype=elements.dtype, device=elements.device), WEIGHTED, grad


def step_reduction(reduction: str, micro_batches) -> str:
    """The reduction the step's quantities read: ``reduction="none"`` whose elements every back-propagated
    loss call weighed equally is their mean (the loop's loss up to a factor, which the per-sample
    quantities do not see and the logged loss leaves out); else the loss module's own."""
    if reduction != "none":
        return reduction
    mbs = [m for m in micro_batches if m.backpropagated]
    if mbs and all(m.per_element and m.elements is None for m in mbs):
        return "mean"
    return reduction


def scaled(scale: torch.Tensor) -> Optional[str]:
    """Why equally weighed elements with backward scale ``scale`` (d root / d mean(l)) are not a mean, or None."""
    c = float(scale)
    return SCALED.format(c=c) if c > 1.0 + 1e-6 else None
