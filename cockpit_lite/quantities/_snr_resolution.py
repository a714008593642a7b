"""Whether float32 resolves the variance estimates of mean_gsnr and early_stopping well enough.

Both divide by a variance v_j = a m2_j - b g_j^2 + eps (m2 = sum_i g_ij^2). Where the samples agree on an
element (its GSNR r_j = g_j^2 / v_j large: a bias whose per-sample gradients are all ~ the same softmax
output), v_j is the small difference of nearly equal float32 sums, whose rounding is about eps * a m2_j:
r_j then carries a relative error of about eps * a m2_j / v_j ~ eps * (1 + r_j). Measured on a CNN whose
output bias has r_j = 1.4e4: mean_gsnr 8.4e-4 relative off the float64 brute force, with the estimate below
1.7e-3 (the float32-rounded per-sample gradients themselves, summed in float64, are within 4e-7: the error is
the float32 sums). A value whose estimated error exceeds ``MAX_REL`` of itself is NaN with the reason.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from ._resolution import _eps

MAX_REL = 1e-4  # of the estimate (about twice the error measured): the logged value stays within ~5e-5

REASON = ("the gradient variance{where} is the difference of nearly equal float32 sums (the samples agree: GSNR "
          "up to {top:.3g} on an element), resolved to about {err:.1g} relative, too coarse (at most {max:g})")


def reasons(ctx, parts: np.ndarray, parts_err: np.ndarray, total: float, total_err: float,
            top: np.ndarray) -> Tuple[Dict[int, str], Optional[str]]:
    """({parameter index: reason}, reason for the total or None) from the values, their absolute error
    estimates in units of eps (float64) and the largest element ratio per parameter (``top``)."""
    eps = _eps(ctx)
    if eps is None:
        return {}, None
    out: Dict[int, str] = {}
    for j, (v, e, t) in enumerate(zip(parts.tolist(), parts_err.tolist(), top.tolist())):
        why = _judge(eps, v, e, t, f" of {ctx.names[j]!r}")
        if why is not None:
            out[j] = why
    return out, _judge(eps, float(total), float(total_err), float(top.max()) if len(top) else 0.0, "")


def _judge(eps: float, value: float, err: float, top: float, where: str) -> Optional[str]:
    if not (math.isfinite(value) and math.isfinite(err)) or err <= 0.0:
        return None
    rel = eps * err / abs(value) if value != 0.0 else math.inf
    if rel <= MAX_REL:
        return None
    return REASON.format(where=where, top=top, err=rel, max=MAX_REL)
