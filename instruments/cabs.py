"""Batch size suggested by CABS (Balles et al. 2017) over steps."""

from ._lines import LinesInstrument


class Cabs(LinesInstrument):
    name = "cabs"
    tab = "gsnr"
    title = "CABS suggested batch size"
    group = "step size"
    keys = ("cabs",)
    ylabel = "batch size"
    description = "Coupled adaptive batch size for SGD: lr·tr(Σ)/(loss); defined for SGD without momentum."
