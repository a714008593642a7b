"""Mean gradient signal-to-noise ratio (Liu et al. 2020) over steps."""

from ._lines import LinesInstrument


class Gsnr(LinesInstrument):
    name = "gsnr"
    tab = "gsnr"
    title = "Mean gradient SNR"
    group = "gradients"
    keys = ("mean_gsnr",)
    ylabel = "mean GSNR"
    description = "Mean over parameters of g_j² / per-sample variance; low: noise dominates the gradient."
