"""Drawing helpers shared by the instruments: display downsampling, log scales, labels."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

#: points drawn per line at most; longer series are reduced to a min/max envelope for display
MAX_POINTS = 2000

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#17becf", "#7f7f7f")
RECENT_COLOR = "#d62728"
ALL_COLOR = "#1f77b4"


def downsample(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS) -> Tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points that keep every spike: per bucket of consecutive steps, the
    minimum and the maximum (NaN ignored), in step order. Display only: stored data is untouched."""
    n = len(steps)
    if n <= max_points:
        return steps, values
    buckets = max(1, max_points // 2)
    starts = np.linspace(0, n, buckets + 1, dtype=np.int64)[:-1]
    starts = np.unique(starts)
    with np.errstate(invalid="ignore"):
        vmin = np.fmin.reduceat(values, starts)
        vmax = np.fmax.reduceat(values, starts)
    # place each bucket's min and max at the step of its first and middle element
    ends = np.append(starts[1:], n)
    mid = (starts + ends - 1) // 2
    out_steps = np.empty(2 * len(starts), dtype=steps.dtype)
    out_values = np.empty(2 * len(starts), dtype=np.float64)
    out_steps[0::2], out_steps[1::2] = steps[starts], steps[mid]
    out_values[0::2], out_values[1::2] = vmin, vmax
    return out_steps, out_values


def envelope(steps: np.ndarray, values: np.ndarray, buckets: int = MAX_POINTS // 2):
    """Per bucket of consecutive points: (first step, mean, min, max). Display only. A bucket holding a
    non-finite value has a NaN mean, so the line shows a gap there as a short series does (a NaN loss
    must not vanish into a bucket mean); its band spans the bucket's finite values."""
    n = len(steps)
    starts = np.unique(np.linspace(0, n, buckets + 1, dtype=np.int64)[:-1])
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        count = np.add.reduceat(finite.astype(np.float64), starts)
        sizes = np.diff(np.append(starts, n))
        mean = np.add.reduceat(v, starts) / count
        mean[count < sizes] = np.nan
        lo = np.fmin.reduceat(np.where(finite, values, np.nan), starts)
        hi = np.fmax.reduceat(np.where(finite, values, np.nan), starts)
    return steps[starts], mean, lo, hi


def draw_line(ax, steps, values, *, label=None, color=None, lw: float = 1.2, **kw):
    """A line over steps; a series longer than MAX_POINTS is drawn as its bucket means with a light
    min-max band (every spike stays visible, the trend stays readable)."""
    if len(steps) <= MAX_POINTS:
        if sparse(steps, values):  # a few points (curvature every k steps, NaN between): each one visible
            kw.setdefault("marker", "o")
            kw.setdefault("ms", 3.5)
        return ax.plot(steps, values, label=label, color=color, lw=lw, **kw)[0]
    s, mean, lo, hi = envelope(steps, values)
    line = ax.plot(s, mean, label=label, color=color, lw=lw, **kw)[0]
    ax.fill_between(s, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    return line


#: a series with at most this many finite points is drawn with a marker at each
SPARSE_POINTS = 60


def sparse(steps, values) -> bool:
    """Few finite points, or finite points isolated between NaNs (which a line alone would not show)."""
    finite = np.isfinite(np.asarray(values, dtype=np.float64))
    n = int(finite.sum())
    if n <= SPARSE_POINTS:
        return True
    isolated = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
    return bool(isolated.any())


def subsample(steps: np.ndarray, values: np.ndarray, max_points: int = MAX_POINTS):
    """An even subset of at most ``max_points`` points (for scatter plots, where an envelope would
    draw two false bands)."""
    if len(steps) <= max_points:
        return steps, values
    keep = np.unique(np.linspace(0, len(steps) - 1, max_points).astype(np.int64))
    return steps[keep], values[keep]


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` finite values (NaN where none is finite)."""
    finite = np.isfinite(values)
    v = np.where(finite, values, 0.0)
    c = np.concatenate([[0.0], np.cumsum(v)])
    k = np.concatenate([[0], np.cumsum(finite)])
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    count = k[idx] - k[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, (c[idx] - c[lo]) / np.maximum(count, 1), np.nan)


def spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """All finite values positive and max/min >= 10**decades: a log axis reads better."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or (v <= 0).any():
        return False
    return bool(np.log10(v.max() / v.min()) >= decades)


def plot_series(ax, run, key: str, *, label: Optional[str] = None, color=None, **kw):
    """Plot ``run.series(key)`` (downsampled for display); returns the finite values drawn."""
    steps, values = run.series(key)
    if not steps.size:
        return np.empty(0)
    draw_line(ax, steps, values, label=label or key, color=color, **kw)
    return values[np.isfinite(values)]


def scale_y(ax, values: Sequence[float]) -> None:
    """A log axis for positive values over decades; a flat series on an axis from 0 (``_tidy.flat_ylim``)."""
    from ._tidy import flat_ylim

    if spans_decades(values):
        ax.set_yscale("log")
    else:
        flat_ylim(ax, values)


def finish(ax, ylabel: str = "", xlabel: str = "step", legend: bool = False) -> None:
    if xlabel:
        ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3, lw=0.5)
    if legend and ax.get_legend_handles_labels()[0]:
        from ._tidy import legend_above_data

        legend_above_data(ax)
    if xlabel == "step":
        from matplotlib.ticker import MaxNLocator

        locator = ax.xaxis.get_major_locator()
        if isinstance(locator, MaxNLocator):
            locator.set_params(integer=True)


def recent_window(n: int) -> int:
    """How many of the last steps count as "recent" (Cockpit: the last 10%, at least 1)."""
    return max(1, int(round(0.1 * n)))


def short_name(key: str, width: int = 28) -> str:
    return key if len(key) <= width else "..." + key[-(width - 3):]
