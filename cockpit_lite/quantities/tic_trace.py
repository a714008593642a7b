"""``tic_trace``: sum_j (1/B) sum_i g_ij^2 / (sum_j c_j + 1e-7), c = Hessian diagonal (Thomas et al. 2020).

Exact with BackPACK's diagonal (``tic_trace/stderr`` = 0); otherwise the trace is a Hutchinson estimate and
``tic_trace/stderr`` its delta-method standard error, or NaN with the reason when the estimate is too
noisy to divide by (curvature/tic.py)."""

from .tic_diag import TICDiag


class TICTrace(TICDiag):
    name = "tic_trace"
    description = ("Takeuchi information criterion with the Hessian trace (exact via BackPACK, else a Hutchinson "
                   "estimate with its standard error)")

    def emit(self, ctx, r) -> None:
        if r.trace is None:
            ctx.emit_nan(self.name, r.trace_reason or "unavailable")
        else:
            ctx.emit(self.name, r.trace)
            ctx.emit(f"{self.name}/stderr", r.trace_stderr)
        ctx.emit_data(self.name, {"curvature": r.curvature, "probes": r.probes})
