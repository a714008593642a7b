"""``update_size``: ||d||_2 with d = theta_{t+1} - theta_t the update the optimizer took."""

from .base import Quantity


class UpdateSize(Quantity):
    name = "update_size"
    needs = frozenset({"update"})
    description = "||theta_{t+1} - theta_t||_2 (stored under step t); total and update_size/<param>"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def after_step(self, ctx):
        ctx.emit_norms("update_size", ctx.update_norms_source())  # ||-d|| = ||d||
