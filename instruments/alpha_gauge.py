"""Where steps land on the local parabola: Cockpit's alpha gauge, all steps vs recent steps.

The loss along the update direction is fitted by a parabola and rescaled to the unit parabola
y = x²: every step starts at x = -1, and alpha is where it lands. alpha < 0: the step stops short
of the minimum (understepping), 0: it lands on the minimum, > 0: it overshoots, 1: it lands at
the starting height on the opposite slope. The histograms show the distribution of alpha over
all steps and over the most recent 10 % of the steps, with their medians (dashed) and quartiles (shaded):
robust statistics, which one outlier does not move (a mean would).
"""

import numpy as np

from ._draw import ALL_COLOR, RECENT_COLOR, recent_window
from ._nan_note import nan_note
from . import Instrument

XLIM = 1.5  # alphas beyond ±XLIM are counted in the edge bins


class AlphaGauge(Instrument):
    name = "alpha_gauge"
    tab = "alpha"
    title = "Alpha: where steps land on the local parabola"
    group = "step size"
    keys = ("alpha",)
    kind = "parabola"
    description = "Distribution of alpha on the unit parabola (-1: no progress, 0: minimum, 1: overshoot)."

    def draw(self, ax, run) -> None:
        from ._tidy import legend_above_data

        _, alpha = run.series("alpha")
        alpha = alpha[np.isfinite(alpha)]
        n = len(alpha)
        recent = alpha[-recent_window(n):]
        x = np.linspace(-XLIM, XLIM, 200)
        ax.plot(x, x ** 2, color="0.25", lw=1.5, label="unit parabola")
        ax.plot([-1], [1], "o", color="0.25", ms=5)
        ax.annotate("start", (-1, 1), xytext=(-30, -2), textcoords="offset points", fontsize="small", color="0.25")
        bins = np.linspace(-XLIM, XLIM, 31)
        height = XLIM ** 2  # y-range of the panel: the top of the parabola
        for values, color, who in ((alpha, ALL_COLOR, f"all {n} steps"), (recent, RECENT_COLOR, f"last {len(recent)}")):
            # robust statistics: the median and quartiles, which one alpha of 93 cannot move
            q1, med, q3 = np.percentile(values, [25, 50, 75])
            above, below = int(np.sum(values > XLIM)), int(np.sum(values < -XLIM))
            off = f"; {below} < -{XLIM}, {above} > +{XLIM} (edge bins)" if above or below else ""
            counts, _ = np.histogram(np.clip(values, -XLIM, XLIM), bins=bins)
            density = counts / max(1, counts.max()) * height * 0.62
            ax.stairs(density, bins, fill=True, color=color, alpha=0.3)
            ax.stairs(density, bins, color=color, lw=1.2,
                      label=f"{who}: median {med:+.2f}, quartiles {q1:+.2f}..{q3:+.2f}{off}")
            ax.axvspan(np.clip(q1, -XLIM, XLIM), np.clip(q3, -XLIM, XLIM), ymax=0.66 / 1.05, color=color, alpha=0.08)
            ax.axvline(np.clip(med, -XLIM, XLIM), ymax=0.66 / 1.05, color=color, ls="--", lw=1)
        _, se = run.series("alpha/stderr")  # each alpha is a fit to noisy observations: its typical error
        se = se[np.isfinite(se)]
        if se.size:
            ax.plot([], [], " ", label=f"one step's alpha ± {np.median(se):.2g} (1 s.e., median over {se.size} steps)")
        ax.set_xlim(-XLIM, XLIM)
        ax.set_ylim(0, height * 1.05)
        ax.set_xticks([-1, -0.5, 0, 0.5, 1])
        ax.set_yticks([])
        ax.set_title(self.title)
        ax.set_xlabel("alpha  (−1: no progress, 0: minimum, 1: overshoot)")
        legend_above_data(ax, loc="upper center", ncol=1)
        nan_note(ax, run, ("alpha",), loc="lower right")
