"""``mean_gsnr``: mean_j g_j^2 / ((1/B) sum_i g_ij^2 - g_j^2 + 1e-5)  (Liu et al. 2020).

The mean runs over all parameter elements (total) or over one tensor's elements (per parameter).
sum_i g_ij^2 is one GEMM for a Linear layer without sequence axes."""

from . import _noise as noise
from . import _snr_resolution
from .base import Quantity

EPS = 1e-5


class MeanGSNR(Quantity):
    name = "mean_gsnr"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"m2"})  # shared per-layer passes (PerSampleView)
    description = "mean gradient signal-to-noise ratio (Liu et al. 2020); total and per param"

    @noise.quietly
    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        sums, counts, errs, tops = noise.snr_sums(ctx, 1.0 / n, 1.0, EPS)  # variance: m2 / n - g^2
        parts = sums / counts
        total = sums.sum() / counts.sum()
        resolved = _snr_resolution.reasons(ctx, parts, errs / counts, total, errs.sum() / counts.sum(), tops)
        noise.emit_total_and_parts(ctx, self.name, total, parts, resolved=resolved)

