"""The step's TIC, shared by ``tic_diag`` and ``tic_trace`` (built once per step): the per-sample second
moment and the Hessian diagonal (exact, or a Hutchinson trace) fed to the formulas of ``curvature/tic.py``."""

from __future__ import annotations

from ..curvature.batch_loss import LOW_PRECISION, CurvatureUnavailable
from ..curvature.tic import TIC, tic_of, trace_ratio
from . import _curvature as curv
from . import _noise as noise


# probes of the estimate that decides whether tr(H) is far enough from 0 to divide by (curvature/tic.py): their
# own stream, (seed + DECIDING_SEED, step), which no other (seed, step) of a run reaches
DECIDING_SEED = 7_777_777


def compute(ctx, exact: "curv.ExactDiagonals", probes: int, seed: int) -> TIC:
    return ctx.once(_compute, exact, probes, seed)


def _compute(ctx, exact, probes, seed) -> TIC:
    low = sorted({str(p.dtype).replace("torch.", "") for p in ctx.watched.params if p.dtype in LOW_PRECISION})
    if low:  # bfloat16 per-sample gradients put sum_j M_j / c_j 0.7% off (float16: 0.03%), logged as exact
        return TIC(None, None, "", 0, f"the per-sample second moment of {'/'.join(low)} parameters carries their "
                                      "rounding (0.7% off for bfloat16), which no standard error describes")
    amp = sorted({str(c.autocast[1]).replace("torch.", "") for c in (ctx.model_calls or ())
                  if getattr(c, "autocast", None) and c.autocast[1] in LOW_PRECISION})
    if amp:  # as above: a bfloat16-autocast MLP's TIC was 0.04% (tic_diag) and 0.26% (tic_trace) off, logged as exact
        return TIC(None, None, "", 0, f"the per-sample second moment of a {'/'.join(amp)} autocast forward carries its "
                                      "rounding, while the Hessian diagonal is re-evaluated in float32: no standard "
                                      "error describes the mismatch")
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
    means = [m / n for m in moments]
    try:
        diag, how = exact.get(ctx, "diag_h")
        if diag is not None:
            d, t, abs_terms = tic_of(means, diag)
            return TIC(d, t, how, 0, abs_terms=abs_terms)
        no_exact = how
        est = curv.hessian_trace_estimate(ctx, probes, seed)  # the value (shared with hess_trace's probes)
        decide = curv.hessian_trace_estimate(ctx, probes, seed + DECIDING_SEED)  # independent: whether to divide
    except CurvatureUnavailable as err:
        return TIC(None, None, "", 0, str(err))
    m_sum = float(sum(float(m.double().sum()) for m in means))
    t, se, why = trace_ratio(m_sum, est.total, est.stderr, (decide.total, decide.stderr))
    return TIC(None, None if why else t, "estimate:hutchinson-diag-hessian", probes, None, se,
               diag_reason=("needs the exact Hessian diagonal (an elementwise ratio with a Hutchinson diagonal "
                            f"estimate has no finite variance), which is unavailable: {no_exact}"),
               trace_reason=why)
