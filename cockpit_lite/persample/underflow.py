"""Gradients too small for float32 statistics: ||g_i||^2, g_i . g and ||g||^2 of a layer whose gradient elements are
~1e-20 (a squeeze-excitation block of an untrained MobileNetV3) are sums of subnormal squares (below 1.2e-38),
kept to a few digits or flushed to 0: norm/inner/ortho tests of that parameter would be finite and off by percents.
Such a parameter is NaN with the reason naming its module; exact zeros (a row no sample used) are not tiny."""

from __future__ import annotations

from typing import Optional

import torch

TINY_SQ = 1e-30  # a squared norm below it is a sum of squares near float32's subnormal range
TINY_ABS = 1e-15  # an element below it squares to below TINY_SQ


def underflow_reason(view, j: int, sq: Optional[torch.Tensor]) -> Optional[str]:
    """The reason parameter j's statistics are unreliable in float32 on this step, or None."""
    p = view.params[j]
    if p.dtype == torch.float64:
        return None
    small = None
    if sq is not None and sq.numel():
        pos = sq[sq > 0]
        if pos.numel() and float(pos.min()) < TINY_SQ:
            small = f"||g_i||^2 down to {float(pos.min()):.2g}"
    if small is None:
        g = view.mean_grad()[j]
        top = float(g.abs().max()) if g.numel() else 0.0
        if not (0.0 < top < TINY_ABS):
            return None
        small = f"max |g| {top:.2g}"
    module = next((c.module_name for _, c, _ in view.feeds[j]), None)
    where = f" ('{module}')" if module else ""
    return (f"its gradients are too small for float32 statistics{where}: {small}, their squares fall in float32's "
            f"subnormal range (below {TINY_SQ:g}) and lose their digits; the values would be off")
