"""Histogram of the individual gradient elements B·g_ij: the latest step against the first one."""

import textwrap

import numpy as np

from ._draw import ALL_COLOR, finish
from ._nan_note import NOTE_STYLE
from . import Instrument


def _valid(obj) -> bool:
    """A drawable histogram structure; the logged 'unavailable' one is ``{"edges": None, "counts": None,
    "reason": ...}`` (docs/record-keys.md)."""
    return isinstance(obj, dict) and obj.get("edges") is not None and obj.get("counts") is not None


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
        valid = [(s, h) for s, h in hists if _valid(h)]
        last_step, last = hists[-1]
        note = None
        if not _valid(last):  # the latest step logged why it has no histogram: say so, with the step
            why = last.get("reason") if isinstance(last, dict) else None
            note = f"step {last_step}: no histogram ({why or 'no reason logged'})"
        ax.set_title(self.title)
        if not valid:
            ax.text(0.5, 0.5, textwrap.fill(note or "no histogram logged", 48, break_on_hyphens=False),
                    transform=ax.transAxes, ha="center", va="center", fontsize="small", color="#b00020")
            ax.set_xticks([])
            ax.set_yticks([])
            return
        last_step, last = valid[-1]
        edges, counts = _hist(last)
        if len(valid) > 1:
            first_step, first = valid[0]
            e0, c0 = _hist(first)
            ax.stairs(c0, e0, color="0.45", lw=1, ls="--", label=f"step {first_step}")
        shown = f"step {last_step}" + (" (last valid)" if note else "")
        ax.stairs(counts, edges, fill=True, color=ALL_COLOR, alpha=0.55, label=shown)
        positive = counts[counts > 0]
        if positive.size and positive.max() / positive.min() >= 100:
            ax.set_yscale("log")
        finish(ax, "count", xlabel=f"gradient element ({last.get('scale', 'B*g_ij').replace('*', '·')})",
               legend=True)
        if note:  # the whole reason, in the NaN notes' box
            ax.text(0.01, 0.02, textwrap.fill(note, 56, break_on_hyphens=False), transform=ax.transAxes,
                    ha="left", va="bottom", **NOTE_STYLE)
