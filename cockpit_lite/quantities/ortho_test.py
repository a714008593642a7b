"""``ortho_test``: Var_perp = (sum_i ||g_i||^2 - sum_i (g_i.g)^2/||g||^2)/(B-1); sqrt(Var_perp/(B ||g||^2))
(Bollapragada et al. 2018, eq. 3.3). Total and per parameter tensor."""

import torch

from . import _cancellation
from . import _noise as noise
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

    def before_step(self, ctx):
        if not noise.precheck(ctx, self.name):
            return
        n = ctx.per_sample.n
        sums = noise.sums(ctx, "sq", "dots")
        sq = sums["sq"]
        gg = noise.sq_mean_norm_vector(ctx)
        parts = ortho_test_value(sq, sums["dots2"], gg, n)
        total = ortho_test_value(sq.sum().reshape(1), sums["dots2_total"], gg.sum().reshape(1), n)[0]
        p2, p2_total, gg_total = sums["dots2"], sums["dots2_total"].sum(), gg.sum()
        # a one-element parameter's g_i all lie along g: its Var_perp is 0 by construction, not a cancellation
        scalar = torch.tensor([p.numel() == 1 for p in ctx.params], device=parts.device) & (gg > 0).to(parts.device)
        parts = torch.where(scalar, torch.zeros_like(parts), parts)
        cancel = _cancellation.reasons(ctx, torch.where(scalar.to(sq.device), torch.zeros_like(sq), sq), sq - p2 / gg,
                                       sq.sum(), sq.sum() - p2_total / gg_total)
        noise.emit_total_and_parts(ctx, self.name, total, parts,
                                   resolved=_cancellation.merged(noise.resolution(ctx), cancel))
