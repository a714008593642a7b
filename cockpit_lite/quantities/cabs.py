"""``cabs``: the batch size CABS suggests (Balles et al. 2017, eq. 22):
lr * sum_j (sum_i g_ij^2 - B g_j^2) / (B * L), L = the mini-batch loss (mean of the per-sample
losses l_i, whatever the loss reduction). Defined for SGD without momentum; NaN with a reason else."""

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
        if not noise.precheck(ctx, self.name, per_param=False):
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
        eps = _resolution._eps(ctx)  # sum_j (sum_i g_ij^2 - B g_j^2): a difference of nearly equal float32 sums
        m2_sum, var_sum = float(m2_sum), float(var_sum)
        why = eps is not None and _resolution._cancelled(eps, self.name, m2_sum, m2_sum - var_sum,
                                                          "sum_i ||g_i||^2 and B ||g||^2", "", power=1.0)
        if why:
            ctx.emit_nan(self.name, why)
            return
        noise.emit_total_and_parts(ctx, self.name, lr * var_sum / (n * L), [], per_param=False)
