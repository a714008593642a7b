"""Takeuchi information criterion approximations (Thomas et al. 2020) over steps.

``tic_diag`` exists only with an exact Hessian diagonal; ``tic_trace`` may be an estimate: each estimate is
drawn with +- 1 standard error (error bars on sparse series, a band on dense ones; exact values record 0:
none). The TIC relates to the generalization gap only through assumptions (Thomas et al. 2020); the title
names what it is, not what it proxies."""

from ._draw import PALETTE, finish, plot_series, scale_y
from ._error_band import error_band
from ._nan_note import nan_note
from ._lines import LinesInstrument

import numpy as np


class Tic(LinesInstrument):
    name = "tic"
    tab = "curvature"
    title = "TIC (Takeuchi information criterion)"
    group = "curvature"
    keys = ("tic_diag", "tic_diag/stderr", "tic_trace", "tic_trace/stderr")
    ylabel = "TIC"
    description = ("Gradient second moment relative to curvature: diagonal (exact Hessian diagonal only) and "
                   "trace approximations; estimates ± 1 standard error.")

    def missing(self, run):
        if run.has_finite("tic_diag") or run.has_finite("tic_trace"):
            return None
        from . import missing_reason

        return missing_reason(run, ["tic_diag", "tic_trace"])

    def draw(self, ax, run) -> None:
        drawn = []
        for color, key in zip(PALETTE, ("tic_diag", "tic_trace")):
            drawn.append(plot_series(ax, run, key, label=self.label(key), color=color))
            error_band(ax, run, key, key + "/stderr", color=color, label=f"{key} ± 1 standard error (estimate)")
        scale_y(ax, np.concatenate(drawn) if drawn else [])
        ax.set_title(self.title)
        finish(ax, self.ylabel, legend=True)
        nan_note(ax, run, ("tic_diag", "tic_trace"))
