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
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .samples import DenseSamples

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


def layer_pass(parts, batch_sizes: List[int], wanted: set, v: Optional[torch.Tensor], R: Optional[float],
               zeros: Callable, p: torch.Tensor) -> dict:
    """The statistics ``wanted`` (among "sq", "m2", "dots") of one parameter, and its histogram over
    [-R, R] where R is given, from one pass over each layer call's per-sample data.

    ``parts``: [(forward position, [ParamSamples, ...])] of the parameter; ``batch_sizes``: samples per
    forward; ``v``: the vector of "dots" (g_i . v); ``zeros(b)``: [b] zeros on the parameter's device.
    Returns {stat: value} with "hist" = (R, {forward position: (counts, max, clipped)}) for the calls
    counted in the pass: those that build their per-sample gradients anyway (no cheap maximum:
    convolutions, sequence Linear, fallback, weights shared within a forward); the others are counted
    on their own (``PerSampleView.histogram``), cheaply."""
    hist = R is not None
    got = dict(parts)
    pieces: Dict[str, list] = {s_: [] for s_ in wanted}
    counted: Dict[int, tuple] = {}
    for pos, b in enumerate(batch_sizes):
        ps_list = got.get(pos)
        if not ps_list:
            for s_ in wanted:
                if s_ != "m2":
                    pieces[s_].append(zeros(b))
            continue
        if len(ps_list) == 1:
            ps = ps_list[0]
            with_hist = hist and not getattr(ps, "cheap_max", False)
            if with_hist or any(ps.materializes(s_) for s_ in wanted):
                res = ps.fused_stats(wanted | {"hist"} if with_hist else wanted, v, R, HIST_BINS)
            else:
                res = ps.factored_stats(wanted, v)
        else:  # weight sharing inside one forward: sum the calls' per-sample gradients, once
            with_hist = hist
            res = DenseSamples(summed(ps_list)).fused_stats(wanted | {"hist"} if hist else wanted, v, R, HIST_BINS)
        if with_hist:
            counted[pos] = res["hist"]
        for s_ in wanted:
            pieces[s_].append(res[s_])
    out: dict = {"hist": (R, counted)} if hist else {}
    for s_ in wanted:
        if s_ == "m2":
            out[s_] = _sum_shaped(pieces[s_], p)
        else:
            out[s_] = pieces[s_][0] if len(pieces[s_]) == 1 else torch.cat(pieces[s_])
    return out


def summed(ps_list) -> torch.Tensor:
    """The per-sample gradients of a parameter used by several calls of one forward: their sum."""
    G = ps_list[0].materialize()
    for ps in ps_list[1:]:
        G = G + ps.materialize()
    return G


def _sum_shaped(parts, p):
    if not parts:
        return torch.zeros(p.shape, device=p.device)
    out = parts[0]
    for x in parts[1:]:
        out = out + x
    return out.reshape(p.shape)
