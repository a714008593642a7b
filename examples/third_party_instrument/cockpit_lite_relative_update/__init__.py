"""A third-party cockpit-lite instrument: the update size relative to the parameter norm.

||d_t|| / ||theta_t|| is the fraction by which one step changes the weights; a common rule of
thumb is that values far above 1e-2 mean the learning rate is too large, far below 1e-4 too small.
It reads two quantities cockpit-lite already logs (``update_size`` and ``param_norm``), so it
needs nothing but this file and the entry point in pyproject.toml.
"""

import numpy as np

from cockpit_lite.instruments import Instrument, downsample, missing_reason

__all__ = ["RelativeUpdate"]


class RelativeUpdate(Instrument):
    name = "relative_update"
    title = "Relative update size ||d|| / ||θ||"
    group = "step size"  # one of cockpit_lite.instruments.GROUPS: the dashboard section it appears in
    keys = ("update_size", "param_norm")
    kind = "lines"
    description = "Fraction of the weights' norm moved by each step; 1e-4..1e-2 is the usual healthy band."

    def missing(self, run):
        # both quantities are needed; say which one is absent (and how to enable it)
        absent = [k for k in self.keys if not run.has_finite(k)]
        return missing_reason(run, absent) if absent else None

    def draw(self, ax, run):
        s_upd, upd = run.series("update_size")
        s_par, par = run.series("param_norm")
        steps, i, j = np.intersect1d(s_upd, s_par, return_indices=True)
        ratio = upd[i] / par[j]
        ax.plot(*downsample(steps, ratio), lw=1.2, label="||d|| / ||θ||")  # display only
        ax.axhspan(1e-4, 1e-2, color="#2ca02c", alpha=0.1, label="usual band")
        ax.set_yscale("log")
        ax.set_title(self.title)
        ax.set_xlabel("step")
        ax.set_ylabel("relative update")
        ax.legend(fontsize="small")
