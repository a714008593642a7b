"""The per-step plan of per-sample work: which per-layer products the step's quantities need.

Decided once per tracked step from the active quantities, before any of them runs, so that each
layer's per-sample data (for convolutions: the per-sample weight-gradient blocks) is built at most once
per step and every product is taken from that one pass, whatever order the quantities were named in:

* ``"sq"``   ||g_i||^2 per parameter (ghost norms: norm/ortho tests);
* ``"dots"`` g_i . g per parameter, g the mean gradient (inner/ortho tests);
* ``"m2"``   sum_i g_ij^2 elementwise (mean_gsnr, early_stopping, cabs, tic, grad_hist_2d's range);
* ``"hist"`` counts of the per-sample gradient elements over [-R, R] (grad_hist_1d), R from the quantity
  that asks for it (``hist_range(view)``).

A quantity declares what it needs with ``per_sample_stats`` (a set of these names); one that wants the
histogram also has ``hist_range(view)``. Plain data and functions of the active quantities: no ``ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

STATS = frozenset({"sq", "m2", "dots", "hist"})
HIST_BINS = 100  # the shared pass counts grad_hist_1d's bins


@dataclass(frozen=True)
class StepPlan:
    stats: frozenset  # among STATS
    hist_owner: Optional[object] = None  # the quantity whose ``hist_range(view)`` sets R

    @property
    def wants_hist(self) -> bool:
        return "hist" in self.stats and self.hist_owner is not None


def plan_for(active: Optional[Iterable[object]]) -> StepPlan:
    """The plan of a step whose active quantities are ``active`` (their order does not matter)."""
    stats, owner = set(), None
    for q in active or ():
        declared = set(getattr(q, "per_sample_stats", ()) or ()) & STATS
        if "hist" in declared and not hasattr(q, "hist_range"):
            declared.discard("hist")  # no range to count with: that quantity counts on its own
        if "hist" in declared and owner is None:
            owner = q
        stats |= declared
    if owner is None:
        stats.discard("hist")
    return StepPlan(frozenset(stats), owner)


def hist_range(plan: StepPlan, view) -> Optional[float]:
    """R of the shared histogram pass, or None (no histogram planned, or the range is not finite:
    the quantity reports why and no shared pass counts it)."""
    if not plan.wants_hist:
        return None
    R = plan.hist_owner.hist_range(view)
    if R is None or not R == R or R in (float("inf"), float("-inf")):
        return None
    return float(R)
