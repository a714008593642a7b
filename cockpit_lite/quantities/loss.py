"""``loss``: the mini-batch loss of the step (micro-batches combined as the reduction implies).

In a data-parallel run, the loss of the global batch: the shards' losses weighted by their sample
counts (mean reduction), summed (sum reduction), or averaged (otherwise). The same reduction counts
the global batch's samples, which the engine writes as the record's ``samples``."""

from ..loss_combine import step_normalised
from .base import Quantity


class Loss(Quantity):
    name = "loss"
    needs = frozenset({"loss"})
    description = "mini-batch loss at step t"
    step_sums = 4  # DDP: processes without a loss, weighted losses, weights, samples (engine/calls.py)

    def before_step(self, ctx):
        if ctx.watched.dist is not None:
            return  # summed over the processes at the end of the hook: local_sums, then with_sums
        loss = ctx.loss()
        if loss is None:
            ctx.emit_nan("loss", "no call of loss_fn was seen in this step (pass loss_fn=<nn.Module> to watch)")
        elif _weighted(ctx):
            ctx.emit_nan("loss", _weighted(ctx))
        else:
            ctx.emit("loss", loss)

    def local_sums(self, ctx):
        """Every process takes part, with or without a loss of its own."""
        loss = ctx.loss()
        mbs = [m for m in ctx.micro_batches if m.backpropagated]
        n = sum(m.batch_size or 0 for m in mbs if not m.repeats)  # distinct samples (engine/repeated_samples.py)
        # a loss already divided by a step-wide count (num_items_in_batch) is averaged over processes,
        # as DDP averages their gradients
        weight = 1.0 if ctx.reduction == "sum" or step_normalised(mbs) else (n if ctx.reduction == "mean" else 1)
        return [loss is None, 0.0 if loss is None else float(loss) * weight, weight, n]

    def with_sums(self, ctx, totals):
        missing, total, weights, samples = totals
        ctx.samples_global = int(samples)
        if missing:
            ctx.emit_nan("loss", "no call of loss_fn was seen in this step on "
                                 f"{int(missing)} of {ctx.watched.dist.size} processes")
            return
        if total != total and _weighted(ctx):  # NaN: here because of the weights the loop gave the elements
            ctx.emit_nan("loss", _weighted(ctx))
            return
        ctx.emit("loss", total if ctx.reduction == "sum" else total / weights)


def _weighted(ctx):
    """Why the logged mean of loss_fn's elements would not be the loss (``engine/loss_elements.py``), or None."""
    return next((m.elements for m in ctx.micro_batches if m.backpropagated and m.elements
                 and bool(m.loss.isnan())), None)
