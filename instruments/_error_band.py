"""The error band of a curvature estimate: value +- its recorded error, where the error is > 0.

Exact values record an error of 0 (no band); estimates record a standard error (``<key>/stderr``) or,
for the top eigenvalue, the residual bound (``hess_max_ev/error_bound``)."""

from __future__ import annotations

import numpy as np


def error_band(ax, run, key: str, err_key: str, *, color, label: str, factor: float = 1.0, max_points: int = 5000):
    """Shade value +- factor * error over the steps that recorded both; returns whether anything was drawn."""
    steps, values = run.series(key)
    err_steps, err = run.series(err_key)
    if not steps.size or not err_steps.size or not (np.nan_to_num(err) > 0).any() or len(err_steps) > max_points:
        return False
    lookup = dict(zip(err_steps.tolist(), err.tolist()))
    e = np.array([lookup.get(s, np.nan) for s in steps.tolist()], dtype=float) * factor
    ax.fill_between(steps, values - e, values + e, color=color, alpha=0.2, lw=0, label=label)
    return True
