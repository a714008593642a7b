"""Whether float32 resolves the variance estimates of mean_gsnr and early_stopping well enough.

Both divide by a variance v_j = a m2_j - b g_j^2 + eps (m2 = sum_i g_ij^2). Where the samples agree on an
element (its GSNR r_j = g_j^2 / v_j large: a bias whose per-sample gradients are all ~ the same softmax
output), v_j is the small difference of nearly equal float32 sums, whose rounding is about eps * a m2_j:
r_j then carries a relative error of about eps * a m2_j / v_j ~ eps * (1 + r_j). Measured on a CNN whose
output bias has r_j = 1.4e4: mean_gsnr 8.4e-4 relative off the float64 brute force, with the estimate below
1.7e-3 (the float32-rounded per-sample gradients themselves, summed in float64, are within 4e-7: the error is
the float32 sums). A value whose estimated error exceeds ``MAX_REL`` of itself is NaN with the reason.

The estimate's cancellation term (b g_j^2 of a m2_j = v_j + b g_j^2, i.e. b r_j^2 per element) counts the rounding
at 2 eps (``ROUNDING``): the per-sample gradients carry the float32 forward's and backward's rounding as well,
squared in m2 and in g^2. With eps, values 1.9 times the estimate off were logged (mean_gsnr / early_stopping of
a bias whose samples agree, GSNR ~1e3: 1.1-1.3e-4 relative, MLPs, CNNs and a GPT block at B = 2-8, where a last
batch of another size lands). Where the samples do not agree (r_j < 1) the estimate stays ~ eps sum_j r_j, which
adds the elements' errors as if they had one sign (measured 0.2-0.7 of it there).

Gradients in 16 bits (a model converted with ``.to(torch.bfloat16)``): the per-sample gradients are the run's
rounded output gradients, whose rounding (2^-8 relative in bfloat16) is the variance's where the samples agree:
mean_gsnr of an MLP's output bias (GSNR ~150, B = 3) was logged 10% off the float64 brute force of the same
bfloat16 weights and 10% off a brute force of the run's own arithmetic. They are judged with that dtype's eps
against ``HALF_MAX_REL`` (the 2e-2 the project holds 16-bit values to, docs/known-limits.md).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from ._resolution import HALF_MAX_REL, _judged_eps

MAX_REL = 1e-4  # of the estimate: the logged value stays within ~5e-5 of the float64 brute force (measured)
ROUNDING = 2.0  # the cancellation term's rounding in units of eps (``_noise.snr_sums``)

REASON = ("the gradient variance{where} is the difference of nearly equal {dtype} sums (the samples agree: GSNR "
          "up to {top:.3g} on an element), resolved to about {err:.1g} relative, too coarse (at most {max:g})")


def reasons(ctx, parts: np.ndarray, parts_err: np.ndarray, total: float, total_err: float,
            top: np.ndarray) -> Tuple[Dict[int, str], Optional[str]]:
    """({parameter index: reason}, reason for the total or None) from the values, their absolute error
    estimates in units of eps (float64) and the largest element ratio per parameter (``top``)."""
    eps, half = _judged_eps(ctx)
    if eps is None:
        return {}, None
    most, dtype = (HALF_MAX_REL, "16-bit") if half else (MAX_REL, "float32")
    out: Dict[int, str] = {}
    for j, (v, e, t) in enumerate(zip(parts.tolist(), parts_err.tolist(), top.tolist())):
        why = _judge(eps, v, e, t, f" of {ctx.names[j]!r}", most, dtype)
        if why is not None:
            out[j] = why
    return out, _judge(eps, float(total), float(total_err), float(top.max()) if len(top) else 0.0, "", most, dtype)


def _judge(eps: float, value: float, err: float, top: float, where: str, most: float = MAX_REL,
           dtype: str = "float32") -> Optional[str]:
    if not (math.isfinite(value) and math.isfinite(err)) or err <= 0.0:
        return None
    rel = eps * err / abs(value) if value != 0.0 else math.inf
    if rel <= most:
        return None
    return REASON.format(where=where, top=top, err=rel, max=most, dtype=dtype)
