"""``update_size``: ||d||_2 with d = theta_{t+1} - theta_t the update the optimizer took.

Where the loop changes the parameters after the step (``_moved.py``), the value of step t (total and the
changed parameters) is replaced by NaN with the reason at step t+1 (or at close)."""

import functools

from ..norm_batch import norms_of
from . import _moved
from .base import Quantity


class UpdateSize(Quantity):
    name = "update_size"
    needs = frozenset({"update"})
    description = "||theta_{t+1} - theta_t||_2 (stored under step t); total and update_size/<param>"
    reads_theta = "norms"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def __init__(self, schedule=None):
        super().__init__(schedule)
        self._after = None  # (step, [floats]: the parameters' norms right after its optimizer step)

    def is_active(self, step: int) -> bool:
        return bool(self.schedule(step)) or self._after is not None  # the check of the last step's update

    def before_step(self, ctx):
        pending, self._after = self._after, None
        if pending is None:
            return
        step, before = pending
        # the same norms as param_norm's (one request, one reduction), compared bit for bit once they are floats
        now = ctx.request_norms(ctx.params, share="params")
        names = list(ctx.names)
        ctx.after_values(self.name, functools.partial(_compare, step=step, names=names, before=before, now=now))

    def after_step(self, ctx):
        if not self.schedule(ctx.step):
            return
        ctx.emit_norms("update_size", ctx.update_norms_source())  # ||-d|| = ||d||
        # ||theta_{t+1}|| now, in the same reduction as the update's norms (no pass of its own)
        after = ctx.request_norms(ctx.params)
        ctx.after_values(self.name, functools.partial(self._keep, step=ctx.step, after=after))

    def _keep(self, ctx, step, after):
        self._after = (step, list(after.values)) if after.values is not None else None

    def finish(self, ctx):
        pending, self._after = self._after, None
        if pending is not None:
            step, before = pending
            now = norms_of(list(ctx.params)).tolist() if ctx.params else []  # the same kernel as the flushes
            _amend(ctx, step, list(ctx.names), [_moved.differ(a, b) for a, b in zip(now, before)])

    def close(self):
        self._after = None


def _compare(ctx, step, names, before, now):
    if now.values is not None:
        _amend(ctx, step, names, [_moved.differ(a, b) for a, b in zip(now.values, before)])


def _amend(ctx, step, names, moved):
    which = [n for n, m in zip(names, moved) if m]
    if not which:
        return
    why = _moved.reason(which)
    ctx.emit_for_step(step, "update_size", reason=why)
    if len(names) > 1:
        for n in which:
            ctx.emit_for_step(step, f"update_size/{n}", reason=why)

