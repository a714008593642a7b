"""``update_size``: ||d||_2 with d = theta_{t+1} - theta_t the update the optimizer took.

Where the loop changes the parameters after the step (``_moved.py``), the value of step t (total and the
changed parameters) is replaced by NaN with the reason at step t+1 (or at close)."""

from . import _moved
from .base import Quantity


class UpdateSize(Quantity):
    name = "update_size"
    needs = frozenset({"update"})
    description = "||theta_{t+1} - theta_t||_2 (stored under step t); total and update_size/<param>"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def __init__(self, schedule=None):
        super().__init__(schedule)
        self._after = None  # (step, the parameters' norms after its optimizer step)

    def is_active(self, step: int) -> bool:
        return bool(self.schedule(step)) or self._after is not None  # the check of the last step's update

    def before_step(self, ctx):
        pending, self._after = self._after, None
        if pending is None:
            return
        step, before = pending
        moved = _moved.changed(before, ctx.params)
        names = list(ctx.names)
        ctx.after_values(self.name, lambda c: _amend(c, step, names, moved.tolist()))

    def after_step(self, ctx):
        if not self.schedule(ctx.step):
            return
        ctx.emit_norms("update_size", ctx.update_norms_source())  # ||-d|| = ||d||
        self._after = (ctx.step, _moved.fingerprint(ctx.params))

    def finish(self, ctx):
        pending, self._after = self._after, None
        if pending is not None:
            step, before = pending
            _amend(ctx, step, list(ctx.names), _moved.changed(before, ctx.params).tolist())

    def close(self):
        self._after = None


def _amend(ctx, step, names, moved):
    which = [n for n, m in zip(names, moved) if m]
    if not which:
        return
    why = _moved.reason(which)
    ctx.emit_for_step(step, "update_size", reason=why)
    if len(names) > 1:
        for n in which:
            ctx.emit_for_step(step, f"update_size/{n}", reason=why)

