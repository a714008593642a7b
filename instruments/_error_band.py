"""The error of a curvature estimate drawn with it: value +- its recorded error, where the error is > 0.

Exact values record an error of 0 (nothing drawn); estimates record a standard error (``<key>/stderr``) or,
for the top eigenvalue, the residual bound (``hess_max_ev/error_bound``). A sparse series (curvature every k
steps) gets an error bar on each point; a dense one a shaded band."""

from __future__ import annotations

import numpy as np

from ._draw import sparse


def error_band(ax, run, key: str, err_key: str, *, color, label: str, factor: float = 1.0, max_points: int = 5000):
    """Draw value +- factor * error over the steps that recorded both; returns whether anything was drawn."""
    steps, values = run.series(key)
    err_steps, err = run.series(err_key)
    if not steps.size or not err_steps.size or not (np.nan_to_num(err) > 0).any() or len(err_steps) > max_points:
        return False
    lookup = dict(zip(err_steps.tolist(), err.tolist()))
    e = np.array([lookup.get(s, np.nan) for s in steps.tolist()], dtype=float) * factor
    if sparse(steps, values):
        ok = np.isfinite(values) & np.isfinite(e) & (e > 0)
        ax.errorbar(steps[ok], values[ok], yerr=e[ok], fmt="none", ecolor=color, elinewidth=1.0, capsize=2.5,
                    alpha=0.8, label=label)
    else:
        ax.fill_between(steps, values - e, values + e, color=color, alpha=0.2, lw=0, label=label)
    return True
