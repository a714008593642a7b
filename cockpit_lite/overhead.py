"""The cockpit's own cost: its share of the step time, and a warning once when it exceeds a budget.

Every tracked step record holds ``time`` (wall seconds of the step) and ``time/cockpit`` (the part
spent in cockpit-lite's own hooks; ``cockpit_lite/quantities/time.py``). The share of a step is
``time/cockpit / time``; a run's share is the sum of one over the sum of the other, over tracked
steps (untracked steps cost the cockpit one check per hook and are not timed).

``watch(..., overhead_budget=0.5)``: warn once (and log a ``warning`` event) when, over the last
``WINDOW`` tracked steps after the first (which pays one-off costs: the per-sample self-check, hook
set-up), the cockpit took more than half of the step time.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np

#: tracked steps the budget is judged on (the first tracked step is left out)
WINDOW = 10
#: fewest tracked steps before the budget is judged
MIN_STEPS = 3


def check_budget(budget: Any) -> Optional[float]:
    """``overhead_budget`` of ``watch``: None, or a share of the step time in (0, 1]."""
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ValueError(f"overhead_budget: a share of the step time in (0, 1] is needed, got {budget!r}")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"overhead_budget: a share of the step time in (0, 1] is needed, got {budget!r}") from None
    if not (0 < value <= 1):
        raise ValueError(f"overhead_budget: a share of the step time in (0, 1] is needed, got {budget!r}")
    return value


def share(time_s, cockpit_s) -> Tuple[float, int]:
    """(sum of cockpit seconds / sum of step seconds, steps used) over the steps where both are finite
    and the step time is positive; (NaN, 0) when there is none."""
    t = np.asarray(time_s, dtype=np.float64)
    c = np.asarray(cockpit_s, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(c) & (t > 0) & (c >= 0)
    if not ok.any():
        return math.nan, 0
    return float(min(1.0, c[ok].sum() / t[ok].sum())), int(ok.sum())


def run_share(run) -> Tuple[float, float, int]:
    """(share over the whole run, share over its recent 10% of tracked steps, steps) from a run
    (anything with ``series``), the first tracked step left out when there are more."""
    s_t, t = run.series("time")
    s_c, c = run.series("time/cockpit")
    steps, i, j = np.intersect1d(s_t, s_c, return_indices=True)
    t, c = t[i], c[j]
    if len(steps) > 1:
        t, c = t[1:], c[1:]
    whole, n = share(t, c)
    k = max(1, int(round(0.1 * len(t))))
    recent, _ = share(t[-k:], c[-k:])
    return whole, recent, n


class OverheadSink:
    """A run-log sink: judges the cockpit's share of the step time; warns once when over ``budget``."""

    def __init__(self, budget: float, emit_event: Callable[..., None], preset: Optional[str] = None):
        self.budget = check_budget(budget)
        self.emit_event = emit_event
        self.preset = preset
        self.window: deque = deque(maxlen=WINDOW)  # (time, cockpit) of recent tracked steps: bounded
        self.seen = 0
        self.warned = False
        self.untimed = 0

    def write(self, record: Dict[str, Any]) -> None:
        if self.warned or record.get("type") != "step" or record.get("amends"):
            return
        values = record.get("values") or {}
        t, c = values.get("time"), values.get("time/cockpit")
        if not isinstance(t, (int, float)) or not isinstance(c, (int, float)):
            self.untimed += 1
            if self.untimed == MIN_STEPS and not self.seen:
                self._say("cockpit-lite: overhead_budget needs the 'time' quantity (time, time/cockpit), which "
                          "this run does not record; add it: watch(..., quantities=[..., 'time'])", None)
            return
        self.seen += 1
        if self.seen == 1:
            return  # one-off costs of the first tracked step
        self.window.append((float(t), float(c)))
        if len(self.window) < MIN_STEPS:
            return
        ratio, n = share(*zip(*self.window))
        if n and ratio > self.budget:
            which = f" of preset {self.preset!r}" if self.preset else ""
            self._say(f"cockpit-lite: its own work{which} took {100 * ratio:.0f}% of the step time over the last "
                      f"{n} tracked steps (overhead_budget {100 * self.budget:.0f}%); choose a lighter preset "
                      "(quantities='economy' or 'default'), or track fewer steps (a schedule such as 'every:10')",
                      ratio)

    def _say(self, message: str, ratio: Optional[float]) -> None:
        self.warned = True
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.emit_event("warning", message, overhead_share=ratio, overhead_budget=self.budget)

    def close(self) -> None:
        pass
