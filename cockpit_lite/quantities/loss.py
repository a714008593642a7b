"""``loss``: the mini-batch loss of the step (micro-batches combined as the reduction implies).

In a data-parallel run, the loss of the global batch: the shards' losses weighted by their sample
counts (mean reduction), summed (sum reduction), or averaged (otherwise). The same reduction counts
the global batch's samples, which the engine writes as the record's ``samples``."""

import math

import torch

from ..loss_combine import step_normalised
from .base import Quantity


def sequence_first_loss(ctx, mbs):
    """(loss, None) or (None, reason) for a mean-reduced step of several micro-batches of a sequence-first
    model: the loss input's dim 0 counts positions there, not sequences, so the micro-batches are weighted
    by the sequence counts the per-sample view read along dim 1 (never built only for this)."""
    view = None
    if ctx.layer_io is not None:
        try:
            view = ctx.per_sample
        except Exception:  # no per-sample view on this step: no sequence counts
            view = None
    if view is None or view.sample_dim != 1 or len(view.batch_sizes) != len(view.micro_batches) \
            or any(not m.backpropagated for m in view.micro_batches):
        return None, (f"{ctx.watched.seq_first} reads dim 1 as the batch: the micro-batches' shares of the step's "
                      "mean loss need their sequence counts, known only on steps with per-sample quantities")
    sizes = torch.tensor(view.batch_sizes, dtype=torch.float64)
    losses = torch.stack([m.loss.detach().double().cpu() for m in view.micro_batches])
    return (losses * sizes).sum() / sizes.sum(), None


class Loss(Quantity):
    name = "loss"
    needs = frozenset({"loss"})
    description = "mini-batch loss at step t"
    step_sums = 4  # DDP: processes without a loss, weighted losses, weights, samples (engine/calls.py)

    def before_step(self, ctx):
        if ctx.watched.dist is not None:
            return  # summed over the processes at the end of the hook: local_sums, then with_sums
        loss = ctx.loss()
        mbs = [m for m in ctx.micro_batches if m.backpropagated]
        if (loss is not None and ctx.watched.seq_first is not None and len(mbs) > 1 and ctx.reduction == "mean"
                and not step_normalised(mbs)):
            loss, why = sequence_first_loss(ctx, mbs)
            if why:
                ctx.emit_nan("loss", why)
                return
        why = _weighted(ctx)
        if loss is None:
            ctx.emit_nan("loss", "no call of loss_fn was seen in this step (pass loss_fn=<nn.Module> to watch)")
        elif why:
            ctx.emit_nan("loss", why)
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
        value = 0.0 if loss is None else math.nan if _heads_weighted(mbs) else float(loss) * weight
        return [loss is None, value, weight, n]

    def with_sums(self, ctx, totals):
        missing, total, weights, samples = totals
        ctx.samples_global = int(samples)
        if missing:
            ctx.emit_nan("loss", "no call of loss_fn was seen in this step on "
                                 f"{int(missing)} of {ctx.watched.dist.size} processes")
            return
        why = _weighted(ctx) if total != total else None  # NaN: because of the weights the loop gave the elements?
        if why:
            ctx.emit_nan("loss", why)
            return
        ctx.emit("loss", total if ctx.reduction == "sum" else total / weights)


def _weighted(ctx):
    """Why the logged mean of loss_fn's elements would not be the loss (``engine/loss_elements.py``), or None."""
    mbs = [m for m in ctx.micro_batches if m.backpropagated]
    return next((m.elements if m.elements else m.scale for m in mbs if (
        (m.elements and bool(m.loss.isnan())) or getattr(m, "scale", None))), None) or _heads_weighted(mbs)


HEADS_WEIGHTED = ("loss calls of this step read the same samples (two heads' losses on one output) and the loop weighed "
                  "them unequally ({weights}): the loss of a sample is a weighted sum of theirs, whose overall scale is "
                  "not known (accumulation, a loss scaler and the weights all multiply the back-propagated loss)")


def _heads_weighted(mbs):
    """Why the step's loss is unknown where loss calls on the same samples (``MicroBatch.repeats``) entered the
    backward pass with different factors (``0.3 * l1 + 0.7 * l2``): each sample's loss is l1_i + l2_i only where
    the factors are equal. None otherwise."""
    groups = {}
    for m in mbs:  # the calls on the same samples (micro-batches of accumulation may be scaled apart)
        groups.setdefault(getattr(m, "samples_of", None), []).append(m)
    for calls in groups.values():
        if len(calls) < 2 or not any(getattr(m, "repeats", False) for m in calls):
            continue
        scales = [float(m.loss_scale) for m in calls if m.loss_scale is not None and m.loss_scale.numel() == 1]
        if len(scales) > 1 and max(scales) - min(scales) > 1e-6 * max(abs(x) for x in scales):
            top = max(abs(x) for x in scales) or 1.0
            return HEADS_WEIGHTED.format(weights=" : ".join(f"{x / top:.3g}" for x in scales))
    return None
