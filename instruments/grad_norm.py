"""Gradient norm ||g||_2 of the mini-batch gradient over steps."""

from ._lines import LinesInstrument


class GradNorm(LinesInstrument):
    name = "grad_norm"
    tab = "grad-norm"
    title = "Gradient norm"
    group = "gradients"
    keys = ("grad_norm",)
    ylabel = "||g||₂"
    description = "L2 norm of the mini-batch gradient (all parameters)."
