"""What a person reads on a matplotlib figure, measured: the text boxes, whether they overlap, whether
they lie inside the figure, and whether a legend covers data. Shared by the dashboard picture tests; also
``draw_panel``, one instrument drawn alone on a real (Agg) canvas, which the panel tests share."""

from __future__ import annotations

from itertools import combinations
from typing import List, Tuple

import numpy as np


def drawn_texts(fig) -> List[Tuple[str, object]]:
    """(text, window extent) of every non-empty visible text the figure draws (after a draw)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for t in fig.texts:
        if t.get_visible() and t.get_text().strip():
            out.append((t.get_text(), t.get_window_extent(renderer)))
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        frame = ax.get_window_extent(renderer)
        pieces = [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label,
                  ax.xaxis.get_offset_text(), ax.yaxis.get_offset_text(), *ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            pieces += legend.get_texts()
        for t in pieces:
            if t.get_visible() and t.get_text().strip():
                out.append((t.get_text(), t.get_window_extent(renderer)))
        for axis, lo, hi in ((ax.xaxis, frame.x0, frame.x1), (ax.yaxis, frame.y0, frame.y1)):
            for tick in axis.get_major_ticks():
                label = tick.label1
                if not (tick.get_visible() and label.get_visible() and label.get_text().strip()):
                    continue
                box = label.get_window_extent(renderer)
                mid = (box.x0 + box.x1) / 2 if axis is ax.xaxis else (box.y0 + box.y1) / 2
                if lo - 1 <= mid <= hi + 1:  # a tick matplotlib drew (it makes some beyond the limits)
                    out.append((label.get_text(), box))
    return out


def overlaps(fig, tolerance: float = 1.0) -> List[Tuple[str, str]]:
    """Pairs of texts whose boxes intersect by more than ``tolerance`` pixels each way."""
    found = []
    for (a, ba), (b, bb) in combinations(drawn_texts(fig), 2):
        dx = min(ba.x1, bb.x1) - max(ba.x0, bb.x0)
        dy = min(ba.y1, bb.y1) - max(ba.y0, bb.y0)
        if dx > tolerance and dy > tolerance:
            found.append((a, b))
    return found


def outside_figure(fig) -> List[str]:
    box = fig.bbox
    return [t for t, b in drawn_texts(fig) if b.x0 < box.x0 - 0.5 or b.x1 > box.x1 + 0.5
            or b.y0 < box.y0 - 0.5 or b.y1 > box.y1 + 0.5]


def data_under_legends(fig) -> List[Tuple[str, str, int]]:
    """(panel title, series label, points) for data points drawn inside a legend's box."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent(renderer)
        for line in ax.get_lines():
            x, y = (np.asarray(v, dtype=float) for v in line.get_data())
            if x.size == 0 or line.get_transform() is not ax.transData:
                continue  # legend-only entries, reference lines across the axes
            ok = np.isfinite(x) & np.isfinite(y)
            if ax.get_yscale() == "log":
                ok &= y > 0
            points = ax.transData.transform(np.column_stack([x[ok], y[ok]]))
            inside = ((points[:, 0] > box.x0 + 1) & (points[:, 0] < box.x1 - 1)
                      & (points[:, 1] > box.y0 + 1) & (points[:, 1] < box.y1 - 1))
            if inside.any():
                found.append((ax.get_title(), line.get_label(), int(inside.sum())))
    return found


def draw_panel(instrument, run, figsize=(6, 4)):
    """The axes of ``instrument`` (an Instrument, or a built-in one's name) drawn alone from ``run`` on a fresh
    Agg figure, rendered once so that errors at draw time surface here."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from cockpit_lite.instruments import RunView, builtin

    if isinstance(instrument, str):
        [instrument] = [i for i in builtin() if i.name == instrument]
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    instrument.draw(ax, RunView(run))
    fig.canvas.draw()
    return ax
