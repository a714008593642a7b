"""``ortho_test``: Var_perp = (sum_i ||g_i||^2 - sum_i (g_i.g)^2/||g||^2)/(B-1); sqrt(Var_perp/(B ||g||^2))
(Bollapragada et al. 2018, eq. 3.3). Total and per parameter tensor; 0 exactly for a one-element parameter.
Where float32 cannot resolve the difference, NaN with the reason (``_resolution.cancellation``)."""

import numpy as np

from . import _noise as noise, _resolution
from .base import Quantity


def ortho_test_value(sq_sum, p2, gg, n):
    """sq_sum: [k] sums of ||g_i||^2, p2: [k] sums of p_i^2, gg: [k] -> [k] values."""
    var = (sq_sum - p2 / gg) / (n - 1)
    return noise.sqrt0(var / (n * gg))


class OrthoTest(Quantity):
    name = "ortho_test"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"sq", "dots"})  # shared per-layer passes (PerSampleView)
    description = "orthogonality test of the gradient noise (Bollapragada et al. 2018); total and per param"

    @noise.quietly
    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        sums = noise.sums(ctx, "sq", "dots")
        sq = sums["sq"]
        gg = noise.sq_mean_norm_vector(ctx)
        parts = ortho_test_value(sq, sums["dots2"], gg, n)
        # a one-element parameter has no direction orthogonal to g: its test is 0 exactly (not rounding noise)
        single = np.array([p.numel() == 1 for p in ctx.params], dtype=bool)
        parts = np.where(single & np.isfinite(parts), 0.0, parts)
        total = ortho_test_value(sq.sum().reshape(1), sums["dots2_total"], gg.sum().reshape(1), n)[0]
        # the difference sum_i ||g_i||^2 - sum_i p_i^2 / ||g||^2, where float32 rounding may dominate it
        cancelled = _resolution.cancellation(ctx, self.name, sq, sums["dots2"] / gg, float(sq.sum()),
                                             float(sums["dots2_total"][0] / gg.sum()), "sum_i ||g_i||^2 and sum_i p_i^2 / ||g||^2")
        cancelled = ({j: r for j, r in cancelled[0].items() if not single[j]}, cancelled[1])
        noise.emit_total_and_parts(ctx, self.name, total, parts,
                                   resolved=_resolution.merged(noise.resolution(ctx), cancelled), tiny_ok=True)
