"""Alpha over steps with a moving median (0: the step lands on the fitted minimum).

The axis holds the bulk of the values (their 2nd to 98th percentile, at least +-1.5); values beyond
it are drawn as triangles on its edge and counted in the legend ("3 above the axis (max 93.4)")."""

import numpy as np

from ._draw import ALL_COLOR, RECENT_COLOR, draw_line, finish, subsample
from ._error_band import error_band
from ._moving import moving_median
from ._nan_note import nan_note
from ._tidy import OFF_AXIS_COLOR, mark_off_axis
from . import Instrument


class AlphaTrace(Instrument):
    name = "alpha_trace"
    tab = "alpha"
    title = "Alpha over steps"
    group = "step size"
    keys = ("alpha",)
    kind = "lines"
    description = "Alpha per step; below 0 understepping, above 0 overshooting the local minimum."

    def draw(self, ax, run) -> None:
        steps, alpha = run.series("alpha")
        finite = alpha[np.isfinite(alpha)]
        top = float(np.clip(np.percentile(np.abs(finite), 98) * 1.15, 1.5, None)) if finite.size else 1.5
        inside = np.abs(alpha) <= top
        s, v = subsample(steps[inside], alpha[inside])
        ax.plot(s, v, ".", color=ALL_COLOR, ms=3, alpha=0.6, label="alpha" if len(s) == inside.sum() else
                f"alpha ({len(s)} of {int(inside.sum())} steps shown)")
        window = max(1, min(200, len(alpha) // 20))
        if window > 1:  # a median: one alpha of 93 must not drag the line off the axis for `window` steps
            draw_line(ax, steps, moving_median(alpha, window), color=RECENT_COLOR, lw=1.5,
                      label=f"moving median ({window})")
        error_band(ax, run, "alpha", "alpha/stderr", color=ALL_COLOR, label="± 1 s.e. of the fit (delta method)")
        ax.axhline(0, color="k", lw=0.8, ls="--")
        if mark_off_axis(ax, steps, alpha, -top, top):
            for y in (-top, top):
                ax.axhline(y, color=OFF_AXIS_COLOR, lw=0.6, ls=":")
        else:
            ax.set_ylim(-top, top)
        ax.set_title(self.title)
        finish(ax, "alpha", legend=True)
        nan_note(ax, run, ("alpha",))
