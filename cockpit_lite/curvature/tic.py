"""Takeuchi information criterion (Thomas et al. 2020) from the per-sample second moment and a
curvature diagonal, shared by ``tic_diag`` and ``tic_trace`` (computed once per step).

M_j = (1/B) sum_i g_ij^2 (``ctx.per_sample.second_moment()``, factored, no B x P tensor),
c = diag of the Hessian: exact through BackPACK where the model allows it, otherwise a Hutchinson
estimate (labelled ``estimate:hutchinson-diag-hessian``).

tic_diag = sum_j M_j / (c_j + 1e-7);  tic_trace = sum_j M_j / (sum_j c_j + 1e-7).

tic_diag is a sum of terms of both signs (c_j < 0 where the Hessian is not positive), many divided by
tiny c_j that are themselves a cancelling sum over samples: float32 rounding moves such a c_j by
~1e-4 relative (a different summation order, e.g. over data-parallel shards), and the total by up
to ~1e-4 of ``abs_terms`` = sum_j |M_j / (c_j + 1e-7)|, which can be far more than 1e-4 of the total
(-69.5 from terms summing to 3876 in absolute value). ``abs_terms`` is logged with the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..persample import noise

from . import step as curv
from .batch_loss import CurvatureUnavailable

EPS = 1e-7


@dataclass
class TIC:
    diag: Optional[float]
    trace: Optional[float]
    curvature: str  # which diagonal was used
    probes: int
    reason: Optional[str] = None
    abs_terms: Optional[float] = None  # sum_j |M_j / (c_j + eps)|: the scale of tic_diag's rounding error


def tic_of(second_moment_mean, curvature_diag):
    """(tic_diag, tic_trace, sum_j |M_j / (c_j + eps)|) from M_j and c_j (lists of tensors shaped like
    the parameters)."""
    m = torch.cat([x.reshape(-1).double() for x in second_moment_mean])
    c = torch.cat([x.reshape(-1).double() for x in curvature_diag])
    terms = m / (c + EPS)
    return float(terms.sum()), float(m.sum() / (c.sum() + EPS)), float(terms.abs().sum())


def compute(ctx, exact: "curv.ExactDiagonals", probes: int, generator: torch.Generator) -> TIC:
    if "curvature.tic" in ctx.cache:
        return ctx.cache["curvature.tic"]
    ctx.cache["curvature.tic"] = result = _compute(ctx, exact, probes, generator)
    return result


def _compute(ctx, exact, probes, generator) -> TIC:
    try:
        ps = ctx.per_sample
        missing = ps.unsupported()
        if missing:
            return TIC(None, None, "", 0, f"per-sample gradients unavailable: {missing}")
        n = ps.n
        if not n:
            return TIC(None, None, "", 0, "no samples on this step")
        moments = noise.second_moment(ctx)  # over the global batch in a data-parallel run
    except Exception as err:
        return TIC(None, None, "", 0, f"per-sample second moment unavailable ({type(err).__name__}: {err})")
    if any(m is None for m in moments):
        return TIC(None, None, "", 0, "per-sample second moment unavailable for some parameters")
    try:
        diag, how = exact.get(ctx, "diag_h")
        used = 0
        if diag is None:
            diag = curv.hessian_diagonal_estimate(ctx, probes, generator)
            how, used = "estimate:hutchinson-diag-hessian", probes
    except CurvatureUnavailable as err:
        return TIC(None, None, "", 0, str(err))
    d, t, abs_terms = tic_of([m / n for m in moments], diag)
    return TIC(d, t, how, used, abs_terms=abs_terms)
