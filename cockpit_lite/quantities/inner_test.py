"""``inner_test``: p_i = g_i . g; Var = (sum_i p_i^2 - B ||g||^4)/(B-1); sqrt(Var / (B ||g||^4))
(Bollapragada et al. 2018, eq. 2.6). Total and per parameter tensor (p_i restricted to it); the
projections are one GEMM per layer."""

import numpy as np

from . import _noise as noise, _resolution
from .base import Quantity


def inner_test_value(p2: np.ndarray, gg: np.ndarray, n: int) -> np.ndarray:
    """p2: [k] sums of squared projections sum_i p_i^2, gg: [k] squared norms -> [k] values."""
    var = (p2 - n * gg * gg) / (n - 1)
    return noise.sqrt0(var / (n * gg * gg))


# relative error about 2 eps * rho where g is rho times below the samples' gradients (_resolution.py)
SENSITIVITY = 2.0
# sum_i p_i^2 - n ||g||^4: each p_i = g_i . g carries the rounding of g_i and of g (forward, backward and the
# GEMM: about 2 eps), twice in p_i^2, so the difference is off by about 2 eps * cond and the test by eps * cond,
# not the eps * cond / 2 of a sum of exact terms: measured up to 1.9 eps * cond against float64 brute force
# (MLPs and a GPT block, B = 2-8; inner_test/0.bias of an MLP at B = 3 was logged 1.4e-4 off at cond 1.1e3)
CANCEL_ROUNDING = 4.0


class InnerTest(Quantity):
    name = "inner_test"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"dots", "sq"})  # shared per-layer passes; "sq" for noise.resolution
    description = "inner-product test of the gradient noise (Bollapragada et al. 2018); total and per param"

    @noise.quietly
    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        sums = noise.sums(ctx, "dots")
        gg = noise.sq_mean_norm_vector(ctx)
        parts = inner_test_value(sums["dots2"], gg, n)
        total = inner_test_value(sums["dots2_total"], gg.sum().reshape(1), n)[0]
        # the difference sum_i p_i^2 - n ||g||^4, where float32 rounding may dominate it
        gt = gg.sum()
        cancelled = _resolution.cancellation(ctx, self.name, sums["dots2"], n * gg * gg, float(sums["dots2_total"][0]),
                                             float(n * gt * gt), "sum_i p_i^2 and n ||g||^4",
                                             rounding=CANCEL_ROUNDING)
        noise.emit_total_and_parts(ctx, self.name, total, parts,
                                   resolved=_resolution.merged(noise.resolution(ctx, SENSITIVITY), cancelled), tiny_ok=True)
