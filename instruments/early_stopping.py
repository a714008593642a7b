"""Evidence-based early-stopping criterion (Mahsereci et al. 2017) over steps."""

from ._lines import LinesInstrument


class EarlyStopping(LinesInstrument):
    name = "early_stopping"
    tab = "gsnr"
    title = "Early-stopping criterion (EB)"
    group = "gradients"
    keys = ("early_stopping",)
    ylabel = "EB criterion"
    threshold = (0.0, "> 0: stopping suggested")
    description = "1 - B·mean_j g_j²/s_j²; above 0 the gradient is indistinguishable from noise."
