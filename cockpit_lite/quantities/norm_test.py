"""``norm_test``: sqrt( (sum_i ||g_i||^2 / ||g||^2 - B) / (B (B-1)) )  (Byrd et al. 2012, eq. 3.9).

Total and per parameter tensor, from ghost norms ||g_i||^2 (no per-sample gradient is built where the
layer has a factored form)."""

from . import _noise as noise, _resolution
from .base import Quantity


class NormTest(Quantity):
    name = "norm_test"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"sq"})  # shared per-layer passes (PerSampleView)
    description = "norm test of the gradient noise (Byrd et al. 2012); total and norm_test/<param>"

    @noise.quietly
    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        sq = noise.sums(ctx, "sq")["sq"]  # [params]: sum_i ||g_i||^2 per parameter
        gg = noise.sq_mean_norm_vector(ctx)
        parts = noise.sqrt0((sq / gg - n) / (n * (n - 1)))
        total = noise.sqrt0((sq.sum() / gg.sum() - n) / (n * (n - 1)))
        # the difference sum_i ||g_i||^2 - n ||g||^2, where float32 rounding may dominate it (samples that agree)
        cancelled = _resolution.cancellation(ctx, self.name, sq, n * gg, float(sq.sum()), float(n * gg.sum()),
                                             "sum_i ||g_i||^2 and n ||g||^2")
        noise.emit_total_and_parts(ctx, self.name, total, parts,
                                   resolved=_resolution.merged(noise.resolution(ctx), cancelled), tiny_ok=True)
