"""The dashboard: instruments arranged by what they diagnose, drawn from one or several runs.

    from cockpit_lite import dashboard
    fig = dashboard.render("runs/exp1", "cockpit.png")                 # one run
    fig = dashboard.render(["runs/a", "runs/b"], "compare.pdf")        # side by side
    fig = dashboard.render(run, instruments=["alpha_gauge", "performance"], steps=(100, 500))

Only instruments with data get a panel; the others are listed at the bottom with the reason
(which quantity is missing and how to enable it, or the reasons logged with its NaN values).
Instruments asked for by name that have no data get a greyed panel with the reason instead.
With several runs, each instrument is a row with one panel per run (lines share the y-range).

matplotlib is imported here, on first use, with the Agg backend when no backend was chosen.
"""

from __future__ import annotations

import os
import tempfile
import textwrap
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from . import dashboard_png

FORMATS = ("png", "pdf", "svg")
COLUMNS = 3
PANEL_W, PANEL_H = 5.2, 3.5  # inches
GROUP_TITLE_H = 0.4
TITLE_H = 0.7
NOTE_LINE_H = 0.2
MARGIN_L, MARGIN_R, MARGIN_B, MARGIN_T = 0.85, 0.85, 0.6, 0.45  # inches around each panel's axes


@dataclass
class Cell:
    """One panel: an instrument on one run, or the reason it has nothing to draw."""

    instrument: Any
    view: Any
    reason: Optional[str] = None


@dataclass
class Layout:
    views: List[Any]
    sections: List[Tuple[str, List[List[Cell]]]] = field(default_factory=list)  # group -> rows of cells
    missing: List[Tuple[str, str, str]] = field(default_factory=list)  # (run label, instrument title, reason)

    @property
    def panels(self) -> List[Cell]:
        return [c for _, rows in self.sections for row in rows for c in row]


def parse_steps(text: Union[None, str, Sequence[Optional[int]]]) -> Tuple[Optional[int], Optional[int]]:
    """``"100:500"``, ``"100:"``, ``":500"`` or ``(100, 500)`` -> ``(start, stop)`` (stop exclusive)."""
    if text is None:
        return None, None
    if isinstance(text, str):
        if text.count(":") != 1:
            raise ValueError(f"step range {text!r}: use START:STOP, START: or :STOP")
        a, b = (s.strip() for s in text.split(":"))
        try:
            start, stop = (int(a) if a else None), (int(b) if b else None)
        except ValueError:
            raise ValueError(f"step range {text!r}: START and STOP must be integers") from None
    else:
        start, stop = text
    if start is not None and stop is not None and stop <= start:
        raise ValueError(f"step range {start}:{stop} is empty (STOP must be greater than START)")
    return start, stop


def _views(runs, steps) -> List[Any]:
    from cockpit_lite.instruments import RunView
    from .runlog import Run, load

    if isinstance(runs, (str, os.PathLike, Run, RunView)):
        runs = [runs]
    start, stop = parse_steps(steps)
    views = []
    for r in runs:
        if isinstance(r, RunView):
            views.append(r)
            continue
        run = load(r) if isinstance(r, (str, os.PathLike)) else r
        views.append(RunView(run, start, stop))
    # identical folder names (runs/a/seed0, runs/b/seed0): use the parent too
    names = [v.label for v in views]
    for v in views:
        if names.count(v.label) > 1 and hasattr(v.run, "logdir"):
            v.label = f"{v.run.logdir.parent.name}/{v.run.logdir.name}"
    return views


def layout(views: List[Any], instruments: Optional[Sequence[Any]] = None) -> Layout:
    """Decide which panels to draw: instruments with data in at least one run, by group."""
    import cockpit_lite.instruments as inst_pkg

    explicit = instruments is not None
    if instruments is None:
        chosen = inst_pkg.discover()
    else:
        names = [i for i in instruments if isinstance(i, str)]
        named = {i.name: i for i in inst_pkg.select(names)} if names else {}
        chosen = [named[i] if isinstance(i, str) else i for i in instruments]
        for i in chosen:
            if getattr(i, "group", None) not in inst_pkg.GROUPS:
                raise ValueError(f"instrument {getattr(i, 'name', i)!r} has group {getattr(i, 'group', None)!r}; "
                                 f"use one of {inst_pkg.GROUPS}")
    out = Layout(views=views)
    for v in views:  # one pass over each log for every key the instruments read
        if hasattr(v, "prefetch"):
            wanted = [k for i in chosen for k in getattr(i, "keys", ())]
            wanted += [k for k in v.keys() if k.split("/", 1)[0] in {"lr", "time", "energy"}]
            v.prefetch(wanted, [k for i in chosen for k in getattr(i, "data_keys", ())])
    for group in inst_pkg.GROUPS:
        rows: List[List[Cell]] = []
        for instrument in (i for i in chosen if i.group == group):
            cells = [Cell(instrument, v, _missing(instrument, v)) for v in views]
            if explicit or any(c.reason is None for c in cells):
                rows.append(cells)
            elif len(views) > 1 and len({c.reason for c in cells}) == 1:
                out.missing.append(("all runs", instrument.title, cells[0].reason))
            else:
                for c in cells:
                    out.missing.append((c.view.label, instrument.title, c.reason))
        if rows:
            per_row = instruments_per_row(len(views))  # one run: rows of COLUMNS panels; two: pairs
            rows = [sum(part, []) for part in balanced(rows, per_row)]
            out.sections.append((group, rows))
    return out


def balanced(items: List[Any], per_row: int) -> List[List[Any]]:
    """``items`` in as few rows of at most ``per_row`` as possible, as even as possible (4 in rows of 3:
    2 + 2, not 3 + 1); each row's panels then share the full width (no empty slots)."""
    if not items:
        return []
    n_rows = -(-len(items) // per_row)
    base, extra = divmod(len(items), n_rows)
    out, at = [], 0
    for r in range(n_rows):
        k = base + (1 if r < extra else 0)
        out.append(items[at:at + k])
        at += k
    return out


def instruments_per_row(n_runs: int) -> int:
    return COLUMNS if n_runs == 1 else max(1, 4 // n_runs)


def _n_columns(n_runs: int) -> int:
    return n_runs * instruments_per_row(n_runs)


def _missing(instrument, view) -> Optional[str]:
    try:
        return instrument.missing(view)
    except Exception as err:
        return f"could not check its data ({type(err).__name__}: {err})"


def render(runs, path: Union[None, str, os.PathLike] = None, *, instruments: Optional[Sequence[Any]] = None,
           steps=None, title: Optional[str] = None, dpi: int = 100, two_processes: bool = False):
    """Draw the dashboard of ``runs`` (a logdir, a ``Run``, or a list of them); save it to ``path``
    (.png, .pdf or .svg) when given. Returns the matplotlib ``Figure``.

    ``two_processes``: rasterize a PNG in two halves at once, the lower one in a forked child
    (``cockpit_lite/dashboard_png.py``); only for a process that forks safely (the command line's)."""
    fmt = None
    if path is not None:
        fmt = output_format(path)
    views = _views(runs, steps)
    fig = figure(layout(views, instruments), title=title)
    if path is not None:
        save(fig, path, dpi=dpi, fmt=fmt, two_processes=two_processes)
    return fig


def output_format(path) -> str:
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot write {str(path)!r}: the file name must end in .png, .pdf or .svg")
    return fmt


def _new_figure(**kw):
    """A Figure on an Agg canvas, outside pyplot: headless, no global state, no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(**kw)
    FigureCanvasAgg(fig)
    return fig


def figure(lay: Layout, title: Optional[str] = None):
    """A matplotlib ``Figure`` for ``lay`` (not attached to pyplot: no GUI, no global state).

    Panels have a fixed size in inches with fixed margins for titles, tick labels and axis labels,
    so text never overlaps and no layout solver runs (constrained layout would triple the time).
    Titles sit at a fixed height: matplotlib would otherwise measure every axis's tick labels at
    each draw, to lift a title above top tick labels, which no instrument draws (about a third of
    the drawing time of a 19-panel dashboard).
    """
    import matplotlib

    with matplotlib.rc_context({"axes.titley": 1.0}):  # read when each Axes is created
        return _figure(lay, title)


def _figure(lay: Layout, title: Optional[str]):
    """``figure`` without the title setting (see there)."""
    from matplotlib.patches import Rectangle

    multi = len(lay.views) > 1
    ncols = _n_columns(len(lay.views))
    notes = _missing_lines(lay, multi)
    blocks: List[Tuple[str, float]] = [("title", TITLE_H)]
    if not lay.sections:
        blocks.append(("empty", 1.2))
    blocks += [("group", GROUP_TITLE_H + len(rows) * PANEL_H) for _, rows in lay.sections]
    if notes:
        blocks.append(("notes", 0.3 + NOTE_LINE_H * len(notes)))
    width, height = ncols * PANEL_W, sum(h for _, h in blocks)
    fig = _new_figure(figsize=(width, height))
    fig.cockpit_rows = []  # (bottom, top) of each panel row, figure fractions, top to bottom (dashboard_png)
    fig.text(0.5, 1 - 0.35 / height, title or _title(lay), ha="center", va="center", fontsize="x-large",
             fontweight="bold")
    top = height - TITLE_H  # inches from the bottom, where the next block starts
    sections = iter(lay.sections)
    for kind, h in blocks[1:]:
        if kind == "empty":
            fig.text(0.5, (top - h / 2) / height, "No instrument has data in this run (see below).",
                     ha="center", va="center", fontsize="large", color="0.3")
        elif kind == "group":
            group, rows = next(sections)
            fig.patches.append(Rectangle((0, (top - h) / height), 1, (h - 0.08) / height,
                                         transform=fig.transFigure, facecolor="#f4f5f8", edgecolor="none",
                                         zorder=-10))
            fig.text(0.1 / width, (top - GROUP_TITLE_H / 2) / height, group.capitalize(), ha="left",
                     va="center", fontsize="large", fontweight="bold", color="#2b3a55")
            y = top - GROUP_TITLE_H
            for row in rows:
                y -= PANEL_H
                fig.cockpit_rows.append((y / height, (y + PANEL_H) / height))
                axes = []
                cell_w = width / len(row)  # a row of fewer panels than columns: wider panels, no empty slots
                for c, cell in enumerate(row):
                    x = c * cell_w
                    rect = ((x + MARGIN_L) / width, (y + MARGIN_B) / height,
                            (cell_w - MARGIN_L - MARGIN_R) / width, (PANEL_H - MARGIN_B - MARGIN_T) / height)
                    ax = fig.add_axes(rect)
                    _draw_cell(ax, cell, multi)
                    axes.append(ax)
                if multi:  # the same instrument on each run: one y-range
                    n = len(lay.views)
                    for i in range(0, len(row), n):
                        _share_ylim(axes[i:i + n], row[i:i + n])
        else:  # notes
            fig.text(0.15 / width, (top - 0.15) / height, "\n".join(notes), ha="left", va="top",
                     fontsize="small", color="0.25", linespacing=1.35)
        top -= h
    return fig


def _title(lay: Layout) -> str:
    parts = []
    for v in lay.views:
        h = v.header
        s, _ = _any_steps(v)
        what = " · ".join(x for x in (h.get("model"), h.get("optimizer")) if x)
        rng = f"steps {s[0]}–{s[-1]}" if len(s) else "no steps"
        parts.append(f"{v.label}" + (f" ({what}, {rng})" if what else f" ({rng})"))
    head = "cockpit-lite: " + " vs ".join(parts) if len(parts) <= 3 else f"cockpit-lite: {len(parts)} runs"
    return head


def _any_steps(view):
    from .runlog import Run

    if isinstance(view.run, Run):  # one numpy array, no loop over 100,000 records
        steps = view.run.steps()
        if view.start is not None:
            steps = steps[steps >= view.start]
        if view.stop is not None:
            steps = steps[steps < view.stop]
        return steps.tolist(), None
    records = getattr(view.run, "records", [])
    steps = [r["step"] for r in records if view._in_range(r["step"])]
    return steps, None


def _missing_lines(lay: Layout, multi: bool) -> List[str]:
    if not lay.missing:
        return []
    lines = ["Not shown, no data:"]
    for label, title, reason in lay.missing:
        who = f"[{label}] " if multi else ""
        text = f"• {who}{title}: {reason}"
        # ~13 characters of small text per inch
        wrapped = textwrap.wrap(text, width=int(13 * _n_columns(len(lay.views)) * PANEL_W) - 4,
                                subsequent_indent="    ")
        lines.extend(wrapped or [text])
    return lines


def _draw_cell(ax, cell: Cell, multi: bool) -> None:
    reason = cell.reason
    if reason is None:
        before = set(map(id, ax.figure.axes))
        try:
            cell.instrument.draw(ax, cell.view)
        except Exception as err:
            for extra in list(ax.figure.axes):  # drop a half-drawn colorbar or twin axis
                if id(extra) not in before:
                    extra.remove()
            ax.clear()
            reason = f"could not draw: {type(err).__name__}: {err}"
            warnings.warn(f"cockpit-lite: instrument {cell.instrument.name!r} failed on {cell.view.label}: {reason}",
                          RuntimeWarning, stacklevel=3)
        else:
            from cockpit_lite.instruments import tidy

            tidy(ax)
    if reason is not None:
        _no_data(ax, cell.instrument.title, reason)
    if multi:
        ax.set_title(f"[{cell.view.label}] {ax.get_title()}", fontsize="medium")


def _no_data(ax, title: str, reason: str) -> None:
    ax.set_facecolor("#ececec")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_color("#bbbbbb")
    ax.set_title(title, color="0.45")
    ax.text(0.5, 0.5, "no data\n\n" + "\n".join(textwrap.wrap(reason, 46)), transform=ax.transAxes,
            ha="center", va="center", fontsize="small", color="0.35", wrap=True)


def _share_ylim(axes, row: List[Cell]) -> None:
    drawn = [ax for ax, cell in zip(axes, row) if cell.reason is None and cell.instrument.kind == "lines"
             and ax.has_data()]
    if len(drawn) < 2 or len({ax.get_yscale() for ax in drawn}) != 1:
        return
    lows, highs = zip(*(ax.get_ylim() for ax in drawn))
    for ax in drawn:
        ax.set_ylim(min(lows), max(highs))


def save(fig, path: Union[str, os.PathLike], *, dpi: int = 100, fmt: Optional[str] = None,
         two_processes: bool = False) -> Path:
    """Write ``fig`` atomically: into a temporary file next to ``path``, then ``os.replace``
    (``two_processes``: see ``render``)."""
    path = Path(path)
    fmt = fmt or output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp.{fmt}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if not (two_processes and fmt == "png" and dashboard_png.usable(fig)
                    and dashboard_png.write_png(fig, fh, dpi)):  # False: nothing written
                fig.savefig(fh, format=fmt, dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; an image is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
