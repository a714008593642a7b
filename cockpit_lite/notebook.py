"""Runs in a notebook: ``plot`` and ``compare`` return matplotlib Figures; ``run_html`` is the HTML
summary Jupyter shows for a ``Run`` (``Run._repr_html_``).

    fig = cockpit_lite.plot("runs/exp1")                          # the dashboard
    fig = cockpit_lite.plot(run, keys=["loss", "grad_norm"])       # chosen keys, one panel each
    fig = cockpit_lite.compare(["runs/a", "runs/b"], keys=["loss", "alpha"])   # runs overlaid

The figures are not attached to pyplot (no GUI, no global state); Jupyter displays a returned Figure.
Long series are drawn as bucket means with a min-max band, as in the dashboard (``instruments/_draw.py``).
"""

from __future__ import annotations

import html
import math
import os
from typing import Any, List, Optional, Sequence, Union

RunLike = Union[str, "os.PathLike[str]", Any]  # a logdir, a log file, a Run or a RunView

PANEL_W, PANEL_H = 6.0, 3.2  # inches per panel of plot(keys=...) and compare


def _views(runs, steps) -> List[Any]:
    from .dashboard import _views as dashboard_views

    return dashboard_views(runs, steps)


def plot(run: RunLike, keys: Optional[Sequence[str]] = None, *, instruments: Optional[Sequence[Any]] = None,
         steps=None, title: Optional[str] = None):
    """A matplotlib ``Figure`` of one run.

    Without ``keys``: the dashboard (``cockpit_lite.dashboard.render``; ``instruments`` chooses panels
    by name). With ``keys``: one panel per scalar key (``run.series(key)`` over steps; a mistyped key
    raises ``KeyError`` with suggestions). ``steps``: ``"100:500"`` or ``(100, 500)``.
    """
    if keys is None:
        from .dashboard import render

        return render(run, instruments=instruments, steps=steps, title=title)
    (view,) = _views(run, steps)
    return _key_panels([view], list(keys), title=title or view.label, legend=False)


def compare(runs: Sequence[RunLike], keys: Sequence[str] = ("loss",), *, labels: Optional[Sequence[str]] = None,
            steps=None, title: Optional[str] = None):
    """A ``Figure`` with one panel per key and, in each, one line per run (labelled with the run's
    folder name, or ``labels``)."""
    if isinstance(runs, (str, os.PathLike)) or not isinstance(runs, Sequence):
        runs = [runs]
    views = _views(list(runs), steps)
    if labels is not None:
        if len(labels) != len(views):
            raise ValueError(f"{len(labels)} labels for {len(views)} runs")
        for v, label in zip(views, labels):
            v.label = str(label)
    return _key_panels(views, list(keys), title=title, legend=True)


def _key_panels(views, keys: List[str], *, title: Optional[str], legend: bool):
    import numpy as np

    from cockpit_lite.instruments import PALETTE, draw_line, draw_note, error_band, finish, nan_lines, scale_y
    from .dashboard import _new_figure

    if not keys:
        raise ValueError("no keys to plot")
    for v in views:  # a typo raises before anything is drawn
        for key in keys:
            v.run.series(key)
    fig = _new_figure(figsize=(PANEL_W, PANEL_H * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    who = (lambda v: "") if len(views) == 1 else (lambda v: f"{v.label}: ")  # whose band or NaN, beside others
    for ax, key in zip(axes, keys):
        drawn, banded = [], False
        for i, v in enumerate(views):
            s, values = v.series(key)
            if s.size:
                color = PALETTE[i % len(PALETTE)]
                draw_line(ax, s, values, label=v.label, color=color)
                drawn.append(values[np.isfinite(values)])
                band = _error_key(v, key)
                if band is not None:  # an estimate carries its error: the dashboard's band (exact values: none)
                    err_key, what = band
                    banded |= error_band(ax, v, key, err_key, color=color, label=f"{who(v)}{key} {what}")
        draw_note(ax, [who(v) + line for v in views for line in nan_lines(v, [key])])
        if not drawn:
            ax.text(0.5, 0.5, f"{key}: no values in {'these runs' if len(views) > 1 else 'this run'}",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
        scale_y(ax, np.concatenate(drawn) if drawn else [])
        ax.set_title(key)
        finish(ax, "", legend=legend or banded)
    if title:
        fig.suptitle(title)
    return fig


def _error_key(view, key: str):
    """``(error key, what the band is)`` of an estimate key: ``<key>/stderr`` (band +- 1 standard error) or,
    for the top eigenvalue, ``hess_max_ev/error_bound`` (+- the residual bound); None for other keys."""
    if "/" in key:
        return None
    keys = set(view.keys())
    if key == "hess_max_ev" and "hess_max_ev/error_bound" in keys:
        return "hess_max_ev/error_bound", "± residual bound"
    if f"{key}/stderr" in keys:
        return f"{key}/stderr", "± 1 standard error"
    return None


def run_html(run) -> str:
    """A small HTML summary of ``run``: its folder, state, steps, model and optimizer, and per
    quantity the last value and how many steps are NaN."""
    esc = html.escape
    h = run.header or {}
    steps = run.steps()
    state = "finished" if run.finished else "running or interrupted"
    span = f"{int(steps[0])}–{int(steps[-1])}" if len(steps) else "none"
    rows = []
    for key in run.keys():
        if "/" in key:
            continue  # totals only; per-parameter parts are in run.keys()
        s, values = run.series(key)
        nan = int(sum(1 for x in values if not math.isfinite(x)))
        last = f"{values[-1]:.4g}" if len(values) else ""
        rows.append(f"<tr><td><code>{esc(key)}</code></td><td>{len(s)}</td><td>{esc(last)}</td>"
                    f"<td>{nan or ''}</td></tr>")
    facts = [("log", str(run.path)), ("state", state), ("step records", f"{len(steps)} (steps {span})"),
             ("skipped steps", str(len(run.skipped))), ("model", str(h.get("model", "?"))),
             ("optimizer", str(h.get("optimizer", "?"))), ("parameters", str(h.get("num_params", "?"))),
             ("cockpit-lite", str(h.get("cockpit_lite", "?")))]
    head = "".join(f"<tr><th style='text-align:left'>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in facts)
    table = ("<table><tr><th>key</th><th>steps</th><th>last</th><th>NaN</th></tr>" + "".join(rows) + "</table>"
             if rows else "<p>no scalar values yet</p>")
    return f"<div class='cockpit-lite-run'><b>cockpit-lite run</b><table>{head}</table>{table}</div>"
