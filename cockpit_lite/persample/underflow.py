"""Gradients too small for float32 statistics: ||g_i||^2, g_i . g and ||g||^2 of a layer whose gradient elements are
~1e-20 (a squeeze-excitation block of an untrained MobileNetV3) are sums of subnormal squares (below 1.2e-38),
kept to a few digits or flushed to 0: norm/inner/ortho tests of that parameter would be finite and off by percents.
Such a parameter is NaN with the reason naming its module; exact zeros (a row no sample used) are not tiny. Judged
on .grad (if every g_i is that small, so is their mean), all parameters in one pass and one sync per step."""

from __future__ import annotations

from typing import List, Optional

import torch

from .dense_grads import dense_grads

TINY_ABS = 1e-15  # a gradient norm below it: every element squares to below 1e-30, near the subnormal range


def underflow_reason(view, j: int) -> Optional[str]:
    """The reason parameter j's statistics are unreliable in float32 on this step, or None."""
    if view.params[j].dtype == torch.float64:
        return None
    top = _norms(view)[j]
    if not (0.0 < top < TINY_ABS):
        return None
    module = next((c.module_name for _, c, _ in view.feeds[j]), None)
    where = f" ('{module}')" if module else ""
    size = f"||g|| {top:.2g}" if top != _UNDERFLOWED else "||g|| below float32's range"
    return (f"its gradients are too small for float32 statistics{where}: {size}, their squares fall in "
            f"float32's subnormal range and lose their digits; the values would be off")


_UNDERFLOWED = 1e-300  # a nonzero gradient whose float32 norm came out 0 (every square flushed)


def _norms(view) -> List[float]:
    """||.grad|| of every parameter (0 without one), cached for the step: one multi-tensor kernel (the max |.grad|
    kernel is ~14x slower on the CPU); below TINY_ABS every element is, and a nonzero gradient whose squares all
    underflowed (norm 0) is marked ``_UNDERFLOWED``. ``.grad``, not ``mean_grad()``: no reduction over the processes
    of a data-parallel run here (the parameters' passes need not run in the same order everywhere); .grad is g times
    the loss's factor (1 for a mean without accumulation)."""
    if "grad_norms" not in view._cache:
        grads = dense_grads(view.inputs)
        present = [j for j, g in enumerate(grads) if g is not None and g.numel()]
        tops = [0.0] * len(grads)
        if present:
            norms = torch._foreach_norm([grads[j].detach().float() for j in present])
            for j, v in zip(present, torch.stack(norms).tolist()):
                tops[j] = v if v != 0.0 or not bool(grads[j].detach().any()) else _UNDERFLOWED
        view._cache["grad_norms"] = tops
    return view._cache["grad_norms"]
