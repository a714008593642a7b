"""What keeps a panel readable and honest: tick labels without offsets, a flat series on an axis that
shows it flat, values beyond the axis marked with their count, and a legend above the data.

``tidy(ax)`` runs on every drawn panel (dashboard.py); the others are called by instruments."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

OFF_AXIS_COLOR = "#b00020"


class CompactFormatter:
    """Tick labels with as few significant digits as keep them distinct (3 to 10), never an offset or a
    multiplier printed beside the axis (matplotlib's ``1e-7+9.99999e-1``, which lands on the title).
    Whole numbers below 10**7 print as integers (steps)."""

    def __init__(self):
        self.digits = 3

    def _one(self, x: float, digits: int) -> str:
        if x == 0:
            return "0"
        if float(x).is_integer() and abs(x) < 1e7:
            return str(int(x))
        return f"{x:.{digits}g}".replace("e-0", "e-").replace("e+0", "e")

    def __call__(self, x, pos=None):
        return self._one(x, self.digits)

    def format_ticks(self, values):
        values = list(values)
        for digits in range(3, 11):
            labels = [self._one(v, digits) for v in values]
            if len(set(labels)) == len(labels):
                break
        self.digits = digits
        return labels


_FORMATTER = None


def _formatter_class():
    """``CompactFormatter`` as a matplotlib ``Formatter`` (made on first use: importing the instruments
    does not import matplotlib)."""
    global _FORMATTER
    if _FORMATTER is None:
        from matplotlib.ticker import Formatter

        class _Compact(CompactFormatter, Formatter):
            pass

        _FORMATTER = _Compact
    return _FORMATTER


def compact_ticks(ax) -> None:
    """Every linear axis of ``ax`` drawn with ``CompactFormatter`` (log axes keep their decades)."""
    from matplotlib.ticker import ScalarFormatter

    for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
        if scale == "linear" and isinstance(axis.get_major_formatter(), ScalarFormatter):
            axis.set_major_formatter(_formatter_class()())


def flat_ylim(ax, values: Sequence[float], rel: float = 1e-3) -> bool:
    """A series that is constant (to ``rel``) is drawn on an axis from 0 to 1.3x its value (or around 0),
    not zoomed into a +-5% band where rounding noise looks like change. True if it was."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return False
    lo, hi = float(v.min()), float(v.max())
    scale = max(abs(lo), abs(hi))
    if hi - lo > rel * scale:
        return False
    c = (lo + hi) / 2
    if scale == 0:
        ax.set_ylim(-1, 1)
    elif c > 0:
        ax.set_ylim(0, 1.3 * c)
    else:
        ax.set_ylim(1.3 * c, 0)
    return True


def robust_limits(values: Sequence[float], q: float = 1.0, pad: float = 0.15):
    """(low, high) holding all but the most extreme ``q`` percent on each side, padded; None if the
    full range is not much wider (then nothing needs to be left off the axis)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 10:
        return None
    lo, hi = np.percentile(v, [q, 100 - q])
    span = max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1e-300))
    lo, hi = lo - pad * span, hi + pad * span
    if v.min() >= lo and v.max() <= hi:
        return None
    full = v.max() - v.min()
    if full <= 3 * (hi - lo):
        return None
    return float(lo), float(hi)


def mark_off_axis(ax, steps, values, low: Optional[float], high: Optional[float], *, what: str = "") -> int:
    """Values above ``high`` (below ``low``) drawn as triangles on the axis edge, with a legend entry that
    counts them and names the extreme one. Sets the y-limits to (low, high). Returns the count."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    total = 0
    ylo, yhi = ax.get_ylim() if low is None or high is None else (low, high)
    low = ylo if low is None else low
    high = yhi if high is None else high
    span = high - low
    for mask, y, marker, word, pick in ((finite & (values > high), high - 0.03 * span, "^", "above", np.max),
                                        (finite & (values < low), low + 0.03 * span, "v", "below", np.min)):
        n = int(mask.sum())
        if not n:
            continue
        total += n
        extreme = float(pick(values[mask]))
        ax.plot(steps[mask], np.full(n, y), marker, color=OFF_AXIS_COLOR, ms=6, ls="none", clip_on=False,
                label=f"{n} {word} the axis{(' ' + what) if what else ''} ({'max' if word == 'above' else 'min'} "
                      f"{extreme:.3g})")
    ax.set_ylim(low, high)
    return total


def legend_above_data(ax, *, loc: str = "upper left", fontsize="x-small", ncol: Optional[int] = None):
    """A legend in the top band of the axes, the y-range raised so that no data lies under it."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    if ncol is None:
        ncol = 1 if len(handles) <= 2 or max(len(s) for s in labels) > 28 else 2
    legend = ax.legend(handles, labels, loc=loc, fontsize=fontsize, framealpha=0.95, ncol=ncol,
                       borderaxespad=0.3, handlelength=1.6)
    # no renderer argument: matplotlib finds one for any canvas (a bare Figure() has no get_renderer)
    box, frame = legend.get_window_extent(), ax.get_window_extent()
    share = min(0.6, (box.height + 4) / max(frame.height, 1))  # of the axes' height, from the top
    lo, hi = ax.get_ylim()
    if ax.get_yscale() == "log":
        a, b = np.log10(lo), np.log10(hi)
        ax.set_ylim(lo, 10 ** (a + (b - a) / (1 - share)))
    elif ax.get_yscale() == "linear":
        ax.set_ylim(lo, lo + (hi - lo) / (1 - share))
    return legend


def tidy(ax) -> None:
    """Run on every drawn panel: compact tick labels (no offset text) on its axes."""
    compact_ticks(ax)
