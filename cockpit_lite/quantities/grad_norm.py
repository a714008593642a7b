"""``grad_norm``: ||g||_2 of the final gradient, total and per parameter tensor."""

from .base import Quantity


class GradNorm(Quantity):
    name = "grad_norm"
    description = "||g||_2 of .grad when the optimizer steps; total and grad_norm/<param>"
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def before_step(self, ctx):
        ctx.emit_norms("grad_norm", ctx.grads(), share="grads")  # one reduction with grad_norm_preclip's
