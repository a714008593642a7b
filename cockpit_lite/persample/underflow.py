"""Gradients too small for float32 statistics: ||g_i||^2, g_i . g and ||g||^2 of a layer whose gradient elements are
~1e-20 (a squeeze-excitation block of an untrained MobileNetV3) are sums of subnormal squares (below 1.2e-38),
kept to a few digits or flushed to 0: norm/inner/ortho tests of that parameter would be finite and off by percents.
Such a parameter is NaN with the reason naming its module; exact zeros (a row no sample used) are not tiny. Judged
on .grad (if every g_i is that small, so is their mean), all parameters in one pass and one sync per step."""

from __future__ import annotations

from typing import Optional

import torch

from .dense_grads import UNDERFLOWED, grad_norms

TINY_ABS = 1e-15  # a gradient norm below it: every element squares to below 1e-30, near the subnormal range


def underflow_reason(view, j: int) -> Optional[str]:
    """The reason parameter j's statistics are unreliable in float32 on this step, or None."""
    if view.params[j].dtype == torch.float64:
        return None
    top = grad_norms(view)[j]  # .grad is g times the loss's factor (1 for a mean without accumulation)
    if not (0.0 < top < TINY_ABS):
        return None
    module = next((c.module_name for _, c, _ in view.feeds[j]), None)
    where = f" ('{module}')" if module else ""
    size = f"||g|| {top:.2g}" if top != UNDERFLOWED else "||g|| below float32's range"
    return (f"its gradients are too small for float32 statistics{where}: {size}, their squares fall in "
            f"float32's subnormal range and lose their digits; the values would be off")
