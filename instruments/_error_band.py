"""The error of a curvature estimate drawn with it: value +- its recorded error, where the error is > 0.

Exact values record an error of 0 (nothing drawn); estimates record a standard error (``<key>/stderr``) or,
for the top eigenvalue, the residual bound (``hess_max_ev/error_bound``). A sparse series (curvature every k
steps) gets an error bar on each point; a dense one a shaded band."""

from __future__ import annotations

import numpy as np

from ._draw import sparse


def error_band(ax, run, key: str, err_key: str, *, color, label: str, factor: float = 1.0, max_points: int = 5000):
    """Draw value +- factor * error over the steps that recorded both; returns whether anything was drawn.

    More than ``max_points`` points are thinned for display, never dropped: a dense band is reduced to the
    outer envelope per bucket of consecutive steps (the lowest value - error and the highest value + error
    of the bucket, so no excursion of the band is lost); sparse error bars to an even subset. The label
    then says so."""
    steps, values = run.series(key)
    err_steps, err = run.series(err_key)
    if not steps.size or not err_steps.size or not (np.nan_to_num(err) > 0).any():
        return False
    e = errors_at(steps, err_steps, err, missing=np.nan) * factor
    if sparse(steps, values):
        ok = np.isfinite(values) & np.isfinite(e) & (e > 0)
        s, v, e = steps[ok], values[ok], e[ok]
        if len(s) > max_points:
            keep = np.unique(np.linspace(0, len(s) - 1, max_points).astype(np.int64))
            label = f"{label} ({len(keep)} of {len(s)} shown)"
            s, v, e = s[keep], v[keep], e[keep]
        ax.errorbar(s, v, yerr=e, fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5, alpha=0.8, label=label)
    else:
        lo, hi = values - e, values + e
        if len(steps) > max_points:
            steps, lo, hi = _envelope(steps, lo, hi, max(1, max_points // 2))
            label = f"{label} (envelope per ≤{_per_bucket(len(values), max_points)} steps)"
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0, label=label)
    return True


def errors_at(steps, err_steps, err, missing: float):
    """The errors logged at ``err_steps`` (``err``) aligned to ``steps``; ``missing`` where a step has none."""
    lookup = dict(zip(err_steps.tolist(), err.tolist()))
    return np.array([lookup.get(s, missing) for s in steps.tolist()], dtype=np.float64)


def _per_bucket(n: int, max_points: int) -> int:
    return int(np.ceil(n / max(1, max_points // 2)))


def _envelope(steps, lo, hi, buckets: int):
    """Per bucket of consecutive points: its first step, the lowest ``lo`` and the highest ``hi`` (NaN only
    where the whole bucket is NaN). Each bucket's value is drawn at its first and its last step, so the band
    is a staircase that covers every point of the bucket."""
    n = len(steps)
    starts = np.unique(np.linspace(0, n, buckets + 1, dtype=np.int64)[:-1])
    ends = np.append(starts[1:], n) - 1
    with np.errstate(invalid="ignore"):
        bl = np.fmin.reduceat(lo, starts)
        bh = np.fmax.reduceat(hi, starts)
    out_s = np.empty(2 * len(starts), dtype=steps.dtype)
    out_s[0::2], out_s[1::2] = steps[starts], steps[ends]
    return out_s, np.repeat(bl, 2), np.repeat(bh, 2)
