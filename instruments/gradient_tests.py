"""The gradient tests in one view: inner-product test vs orthogonality test per step.

The norm test combines both: norm² ≈ inner² + ortho², so the unit circle is where the norm test
equals its threshold 1, and the unit square where the inner-product and orthogonality tests do.
Points inside pass (the batch is large enough); points outside suggest a larger batch.
"""

import numpy as np

from ._draw import RECENT_COLOR, recent_window
from ._nan_note import nan_note
from . import Instrument, missing_reason


class GradientTests(Instrument):
    name = "gradient_tests"
    tab = "gradient-tests"
    title = "Gradient tests (inside: batch large enough)"
    group = "gradients"
    keys = ("inner_test", "ortho_test", "norm_test")
    kind = "scatter"
    description = "Inner-product test vs orthogonality test per step; the circle is the norm test's threshold."

    def missing(self, run):
        if run.has_finite("inner_test") and run.has_finite("ortho_test"):
            return None
        absent = [k for k in ("inner_test", "ortho_test") if not run.has_finite(k)]
        return missing_reason(run, absent)

    def draw(self, ax, run) -> None:
        s_in, inner = run.series("inner_test")
        s_or, ortho = run.series("ortho_test")
        steps, i_in, i_or = np.intersect1d(s_in, s_or, return_indices=True)
        x, y = ortho[i_or], inner[i_in]
        ok = np.isfinite(x) & np.isfinite(y)
        steps, x, y = steps[ok], x[ok], y[ok]
        if len(steps) > 5000:  # display only: an even subset keeps the picture
            keep = np.unique(np.linspace(0, len(steps) - 1, 5000).astype(int))
            steps, x, y = steps[keep], x[keep], y[keep]
        points = ax.scatter(x, y, c=steps, cmap="viridis", s=9, alpha=0.7, lw=0)
        k = recent_window(len(steps))
        ax.scatter(x[-k:], y[-k:], facecolors="none", edgecolors=RECENT_COLOR, s=22, lw=0.9,
                   label=f"last {k} steps")
        t = np.linspace(0, np.pi / 2, 100)
        ax.plot(np.cos(t), np.sin(t), color="k", lw=1, ls="--", label="norm test = 1")
        ax.plot([0, 1, 1], [1, 1, 0], color="0.5", lw=0.8, ls=":", label="inner / ortho = 1")
        span = np.concatenate([x, y]) if len(x) else np.array([1.0])
        top = float(np.clip(np.percentile(span, 98) * 1.15, 1.3, 50))
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xlabel("orthogonality test")
        ax.set_ylabel("inner-product test")
        ax.set_title(self.title)
        ax.grid(True, alpha=0.3, lw=0.5)
        from ._tidy import legend_above_data

        legend_above_data(ax, loc="upper right", ncol=1)
        ax.set_xlim(ax.get_ylim())  # the same range on both axes: the circle stays a circle
        nan_note(ax, run, ("inner_test", "ortho_test"))
        bar = ax.figure.colorbar(points, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label("step", fontsize="small")
        bar.ax.tick_params(labelsize="x-small")
