"""What the advisor could not check on a run, and why: a quiet advisor is only reassuring where its
rules had numbers to read. A quantity that was logged but NaN on the recent steps (with the reasons the
run logged), or not recorded at all, leaves the checks that need it undone; the report says so instead
of "No problem found"."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .thresholds import Thresholds

#: quantity -> the checks that need it (rules.py)
NEEDED_BY: Dict[str, str] = {
    "alpha": "step size vs the local minimum (lr_too_large, lr_too_small)",
    "norm_test": "gradient noise vs batch size (gradient_noise_dominates, batch_larger_than_needed)",
    "inner_test": "batch larger than needed (batch_larger_than_needed)",
    "ortho_test": "batch larger than needed (batch_larger_than_needed)",
    "update_size": "update size vs parameters (lr_too_small)",
    "grad_norm": "exploding, vanishing and dead layers (per-parameter gradient norms)",
    "loss": "loss spikes, rising cost",
    "early_stopping": "overfitting signal (overfitting_signal)",
}


def unchecked(run, thresholds: Optional[Dict[str, Any]] = None) -> List[Tuple[str, str]]:
    """``[(quantity, why)]``: recorded quantities with too few finite values in the advisor's window
    (the reasons logged with their NaNs, most frequent first), then the quantities not recorded."""
    th = Thresholds().with_overrides(thresholds)
    keys = set(run.keys())
    out, absent = [], []
    for key, checks in NEEDED_BY.items():
        if key not in keys:
            absent.append(key)
            continue
        steps, values = run.series(key)
        steps, values = steps[-th.window:], values[-th.window:]
        finite = int(np.isfinite(values).sum())
        if finite >= th.min_points:
            continue
        nan = len(values) - finite
        if not nan:  # a short run: every value is there, but fewer than the rules need
            out.append((key, f"only {finite} value(s) in the last {len(values)} tracked steps, the rules need "
                             f"{th.min_points}; not checked: {checks}"))
            continue
        reasons = {s: r for s, r in run.reasons(key).items() if s in set(steps.tolist())}
        counts = Counter(reasons.values()).most_common(2)
        why = "; ".join(f"{r} ({n}x)" for r, n in counts) if counts else "no reason logged"
        out.append((key, f"NaN on {nan} of the last {len(values)} tracked steps ({why}); "
                         f"not checked: {checks}"))
    if absent:
        out.append((", ".join(absent), "not recorded; not checked: "
                    + "; ".join(NEEDED_BY[k] for k in absent if k not in ("inner_test", "ortho_test"))))
    return out


def lines(run, thresholds: Optional[Dict[str, Any]] = None) -> List[str]:
    """The "could not check" part of a report, one line per quantity (empty when everything was checked)."""
    found = unchecked(run, thresholds)
    if not found:
        return []
    return ["Could not check:"] + [f"  - {key}: {why}" for key, why in found]
