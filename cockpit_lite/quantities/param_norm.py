"""``param_norm``: ||theta_t||_2 at the point where the gradient was taken."""

from .base import Quantity


class ParamNorm(Quantity):
    name = "param_norm"
    description = "||theta_t||_2, total and param_norm/<param>"
    reads_theta = "norms"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def before_step(self, ctx):
        ctx.emit_norms("param_norm", ctx.params, share="params")  # update_size's check reads the same norms
