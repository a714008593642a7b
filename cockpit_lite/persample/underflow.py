"""Gradients too small for float32 statistics: ||g_i||^2, g_i . g and ||g||^2 of a layer whose gradient elements are
~1e-20 (a squeeze-excitation block of an untrained MobileNetV3) are sums of subnormal squares (below 1.2e-38),
kept to a few digits or flushed to 0: norm/inner/ortho tests of that parameter would be finite and off by percents.
Such a parameter is NaN with the reason naming its module; exact zeros (a row no sample used) are not tiny. Judged
on the mean gradient g (if every g_i is that small, so is g), all parameters in one pass and one sync per step."""

from __future__ import annotations

from typing import List, Optional

import torch

TINY_ABS = 1e-15  # an element below it squares to below 1e-30, a sum of such squares nears the subnormal range


def underflow_reason(view, j: int) -> Optional[str]:
    """The reason parameter j's statistics are unreliable in float32 on this step, or None."""
    if view.params[j].dtype == torch.float64:
        return None
    top = _abs_max(view)[j]
    if not (0.0 < top < TINY_ABS):
        return None
    module = next((c.module_name for _, c, _ in view.feeds[j]), None)
    where = f" ('{module}')" if module else ""
    return (f"its gradients are too small for float32 statistics{where}: max |g| {top:.2g}, their squares fall in "
            f"float32's subnormal range and lose their digits; the values would be off")


def _abs_max(view) -> List[float]:
    """max |g_j| of every parameter's mean gradient (NaN where unavailable), cached for the step."""
    if "abs_max" not in view._cache:
        g = view.mean_grad()
        view._cache["abs_max"] = torch.stack(torch._foreach_norm([t.detach().float() for t in g], float("inf"))).tolist()
    return view._cache["abs_max"]
