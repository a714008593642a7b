"""Takeuchi information criterion (Thomas et al. 2020) from the per-sample second moment and the
Hessian's diagonal: the formulas (a step's TIC for ``tic_diag`` and ``tic_trace``, computed once per step, is
built in ``quantities/_tic.py``).

M_j = (1/B) sum_i g_ij^2 (``PerSampleView.second_moment()``, factored, no B x P tensor),
c = diag of the Hessian, exact through BackPACK where the model allows it (quantities/_curvature.ExactDiagonals).

tic_diag = sum_j M_j / (c_j + 1e-7): only with the exact diagonal. Dividing elementwise by a Hutchinson
estimate of c_j (each entry from a handful of probes, often near zero or of the wrong sign) has no finite
variance: that gave values 19% to 117x off, with the wrong sign, logged as plain numbers. Without an
exact diagonal ``tic_diag`` is NaN with the reason.

tic_trace = sum_j M_j / (tr(H) + 1e-7): with the exact diagonal, exact (stderr 0); otherwise tr(H) is a
Hutchinson estimate T +- s_T (the sum of the Hutchinson diagonal: the same number) and the value carries
the delta-method standard error |M| s_T / (T + 1e-7)^2 (M is exact for the batch). The delta method needs
the denominator well away from zero. Whether it is, is decided on a second, independent Hutchinson estimate
T' +- s_T' of as many probes (NaN with the reason when s_T' > MAX_REL_SE |T'|): deciding on T itself kept
exactly the draws where T came out high, and the values logged near the cut-off were 42-48% low with 96-100%
of them more than 2 standard errors off (a Monte Carlo of 4000 draws on a small MLP's exact Hessian). With
the decision on T' and MAX_REL_SE 0.2, 30 probes: where they leave T a relative error of 0.18 (a LayerNorm net,
tests/quantities/test_tic_honest.py), 77% of the draws give a value, 96% of them within 2 s.e., 99% within 3,
bias +3%; where they leave 0.23-0.4 (that MLP), 0-8% give one, 5% of those beyond 2 s.e.; the rest is NaN.

tic_diag is a sum of terms of both signs (c_j < 0 where the Hessian is not positive), many divided by
tiny c_j that are themselves a cancelling sum over samples: float32 rounding moves such a c_j by
~1e-4 relative (a different summation order, e.g. over data-parallel shards), and the total by up
to ~1e-4 of ``abs_terms`` = sum_j |M_j / (c_j + 1e-7)|, which can be far more than 1e-4 of the total
(-69.5 from terms summing to 3876 in absolute value). ``abs_terms`` is logged with the value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch


EPS = 1e-7
MAX_REL_SE = 0.2  # largest relative standard error of the (independent) trace estimate that decides


@dataclass
class TIC:
    diag: Optional[float]
    trace: Optional[float]
    curvature: str  # which diagonal / trace was used
    probes: int
    reason: Optional[str] = None  # neither value (and why)
    trace_stderr: float = 0.0
    diag_reason: Optional[str] = None  # why tic_diag alone is unavailable
    trace_reason: Optional[str] = None  # why tic_trace alone is unavailable
    abs_terms: Optional[float] = None  # sum_j |M_j / (c_j + eps)|: the scale of tic_diag's rounding error


def tic_of(second_moment_mean, curvature_diag):
    """(tic_diag, tic_trace, sum_j |M_j / (c_j + eps)|) from M_j and c_j (lists of tensors shaped like
    the parameters)."""
    m = torch.cat([x.reshape(-1).double() for x in second_moment_mean])
    c = torch.cat([x.reshape(-1).double() for x in curvature_diag])
    terms = m / (c + EPS)
    return float(terms.sum()), float(m.sum() / (c.sum() + EPS)), float(terms.abs().sum())


def trace_ratio(m_sum: float, trace: float, trace_se: float, decide=None):
    """(m_sum / (trace + eps), its delta-method standard error, reason or None). ``decide``: (total, stderr) of
    an independent estimate of the same trace, on which the ratio is formed or refused (default: this one)."""
    denom = trace + EPS
    d_total, d_se = decide if decide is not None else (trace, trace_se)
    if not all(math.isfinite(v) for v in (trace, trace_se, d_total, d_se)):
        return math.nan, math.nan, f"the Hutchinson trace estimate is not finite ({trace} +- {trace_se})"
    if not d_se <= MAX_REL_SE * abs(d_total + EPS):
        return math.nan, math.nan, (
            f"the Hutchinson estimate of tr(H) = {d_total:.4g} +- {d_se:.2g} (1 s.e.) is too noisy to divide by "
            f"(relative s.e. above {MAX_REL_SE}); more probes or an exact diagonal (BackPACK) are needed")
    return m_sum / denom, abs(m_sum) * trace_se / denom ** 2, None
