"""``early_stopping`` (EB criterion, Mahsereci et al. 2017):
s_j^2 = (sum_i g_ij^2 - B g_j^2)/(B-1);  1 - B mean_j [ g_j^2 / (s_j^2 + 1e-5) ];  > 0 suggests stopping.

Total (mean over all parameter elements) and per parameter tensor."""

from . import _noise as noise
from . import _snr_resolution
from .base import Quantity

EPS = 1e-5


class EarlyStopping(Quantity):
    name = "early_stopping"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"m2"})  # shared per-layer passes (PerSampleView)
    description = "evidence-based early-stopping criterion (Mahsereci et al. 2017); > 0 suggests stopping"

    @noise.quietly
    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        a, b = 1.0 / (n - 1), n / (n - 1)  # s_j^2 = (m2 - n g^2)/(n-1)
        sums, counts, errs, tops = noise.snr_sums(ctx, a, b, EPS)
        parts = 1 - n * sums / counts
        total = 1 - n * sums.sum() / counts.sum()
        if any(noise.arithmetic_too_coarse(float(v), float(x)) for v, x in
               zip([*parts.tolist(), float(total)], [*(n * sums / counts).tolist(), float(n * sums.sum() / counts.sum())])):
            # near 0, 1 - n mean_j r_j cancels: the r_j again in float64 arithmetic (one tensor at a time)
            sums, counts, errs, tops = noise.snr_sums(ctx, a, b, EPS, exact=True)
            parts = 1 - n * sums / counts
            total = 1 - n * sums.sum() / counts.sum()
        resolved = _snr_resolution.reasons(ctx, parts, n * errs / counts, total, n * errs.sum() / counts.sum(), tops)
        noise.emit_total_and_parts(ctx, self.name, total, parts, resolved=resolved)
