"""Histogram of the individual gradient elements B·g_ij: the latest step against the first one."""

import numpy as np

from ._draw import ALL_COLOR, finish
from . import Instrument


def _hist(obj):
    edges = np.asarray(obj["edges"], dtype=np.float64)
    counts = np.asarray(obj["counts"], dtype=np.float64)
    if edges.ndim != 1 or counts.shape != (len(edges) - 1,):
        raise ValueError(f"grad_hist_1d: {len(edges)} edges do not fit {counts.shape} counts")
    return edges, counts


class GradHist1d(Instrument):
    name = "grad_hist_1d"
    tab = "histograms"
    title = "Gradient element histogram"
    group = "gradients"
    keys = ("grad_hist_1d",)
    data_keys = ("grad_hist_1d",)
    kind = "histogram"
    description = "Histogram of individual gradient elements B·g_ij at the latest logged step."

    def draw(self, ax, run) -> None:
        hists = run.data("grad_hist_1d")
        last_step, last = hists[-1]
        edges, counts = _hist(last)
        if len(hists) > 1:
            first_step, first = hists[0]
            e0, c0 = _hist(first)
            ax.stairs(c0, e0, color="0.45", lw=1, ls="--", label=f"step {first_step}")
        ax.stairs(counts, edges, fill=True, color=ALL_COLOR, alpha=0.55, label=f"step {last_step}")
        positive = counts[counts > 0]
        if positive.size and positive.max() / positive.min() >= 100:
            ax.set_yscale("log")
        ax.set_title(self.title)
        finish(ax, "count", xlabel=f"gradient element ({last.get('scale', 'B*g_ij').replace('*', '·')})",
               legend=True)
