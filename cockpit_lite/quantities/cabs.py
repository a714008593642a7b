"""``cabs``: the batch size CABS suggests (Balles et al. 2017, eq. 22):
lr * sum_j (sum_i g_ij^2 - B g_j^2) / (B * L), L = the mini-batch loss (mean of the per-sample
losses l_i, whatever the loss reduction). Defined for SGD without momentum; NaN with a reason else."""

import math

import torch

from . import _noise as noise, _resolution
from .base import Quantity


def cabs_unsupported_reason(optimizer):
    if type(optimizer) is not torch.optim.SGD:
        return f"CABS is derived for plain SGD, the optimizer is {type(optimizer).__name__}"
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    if any(g.get("momentum", 0) for g in optimizer.param_groups):
        return "CABS is derived for SGD without momentum"
    if len(lrs) > 1:
        return "CABS needs one learning rate; the param groups have several"
    return ""


def _cancelled(ctx, m2_sum: float, var_sum: float) -> str:
    """Why float32 does not resolve sum_j (sum_i g_ij^2 - B g_j^2), a difference of nearly equal sums where the
    samples' gradients agree (``_resolution.cancellation``'s rule, for a value linear in the difference), or ''."""
    eps = _resolution._eps(ctx)
    if eps is None or not (math.isfinite(m2_sum) and math.isfinite(var_sum)) or m2_sum <= 0.0:
        return ""
    cond = m2_sum / var_sum if var_sum > 0 else math.inf
    if eps * cond <= _resolution.CANCEL_MAX_REL:  # linear in the difference: its whole relative error
        return ""
    return (f"the gradient variance is {cond:.3g} times smaller than the sums it is the difference of (sum_i ||g_i||^2 "
            f"and B ||g||^2): float32 rounding leaves it about {min(eps * cond, 1.0):.1g} relative, too coarse "
            f"(at most {_resolution.CANCEL_MAX_REL:g})")


class CABS(Quantity):
    name = "cabs"
    needs = frozenset({"layer_io"})
    per_sample_stats = frozenset({"m2"})  # shared per-layer passes (PerSampleView)
    description = "batch size suggested by CABS (Balles et al. 2017); SGD without momentum only"

    def before_step(self, ctx):
        reason = cabs_unsupported_reason(ctx.watched.optimizer)
        if reason:
            ctx.emit_nan(self.name, reason)
            return
        if not noise.precheck(ctx, self.name):
            return
        view = ctx.per_sample
        n = view.n
        reasons = view.unsupported()
        if reasons:
            first = next(iter(reasons))
            ctx.emit_nan(self.name, f"per-sample information unavailable for {first}: {reasons[first]}")
            return
        L, why = noise.mean_loss(ctx)
        if why:
            ctx.emit_nan(self.name, f"per-sample losses unavailable: {why}")
            return
        lr = float(ctx.watched.optimizer.param_groups[0]["lr"])
        pairs = list(zip(noise.mean_grad(ctx), noise.second_moment(ctx)))
        var_sum = sum((m2.double() - n * g.double().pow(2)).sum() for g, m2 in pairs)
        m2_sum = sum(m2.double().sum() for _, m2 in pairs)
        why = _cancelled(ctx, float(m2_sum), float(var_sum))
        if why:
            ctx.emit_nan(self.name, why)
            return
        noise.emit_total_and_parts(ctx, self.name, lr * var_sum / (n * L), [], per_param=False)
