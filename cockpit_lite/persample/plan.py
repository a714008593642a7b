"""The per-step plan of per-sample work: which per-layer products the step's quantities need.

Decided once per tracked step from the active quantities, before any of them runs, so that each
layer's per-sample data (for convolutions: the per-sample weight-gradient blocks) is built at most once
per step and every product is taken from that one pass, whatever order the quantities were named in:

* ``"sq"``   ||g_i||^2 per parameter (ghost norms: norm/ortho tests);
* ``"dots"`` g_i . g per parameter, g the mean gradient (inner/ortho tests);
* ``"m2"``   sum_i g_ij^2 elementwise (mean_gsnr, early_stopping, cabs, tic, grad_hist_2d's range);
* ``"hist"`` counts of the per-sample gradient elements over [-R, R] (grad_hist_1d), R from the quantity
  that asks for it (``hist_range(view)``);
* ``"dir"``  g_i . d per parameter for a direction d known before the step's quantities run: alpha's
  unit update of the previous step, which its end point at this step projects onto
  (``per_sample_direction(step)``: the list of tensors it will pass to ``PerSampleView.dots``).

A quantity that will project the step's per-sample gradients onto a vector known only after the
optimizer step (alpha's start, ``per_sample_keep(step)`` true) has the pass keep the blocks it builds
(convolutions; sequence Linear layers and others that materialize for the histogram), up to
``KEEP_FLOATS`` floats per step (64 MB in float32; beyond that its own route per layer), so that the
projection is one small product per block instead of a convolution or a GEMM the size of the layer's
forward (``kept_dots``).

A quantity declares what it needs with ``per_sample_stats`` (a set of these names); one that wants the
histogram also has ``hist_range(view)``. Plain data and functions of the active quantities: no ``ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch

from .samples import DenseSamples

STATS = frozenset({"sq", "m2", "dots", "hist"})  # declared with ``per_sample_stats``; "dir" is asked for apart
HIST_BINS = 100  # the shared pass counts grad_hist_1d's bins
KEEP_FLOATS = 1 << 24  # per-sample blocks kept for a projection after the step, at most (per step)


@dataclass(frozen=True)
class StepPlan:
    stats: frozenset  # among STATS
    hist_owner: Optional[object] = None  # the quantity whose ``hist_range(view)`` sets R
    direction: Optional[tuple] = None  # the tensors of "dir" (not copied) ...
    versions: tuple = ()  # ... and their versions when planned: changed in place, they are not served
    keep: bool = False  # keep the pass's blocks for a projection after the step

    @property
    def wants_hist(self) -> bool:
        return "hist" in self.stats and self.hist_owner is not None

    def serves(self, vecs) -> bool:
        """Whether ``vecs`` is the planned direction, unchanged since planned (then its projections come
        from the step's pass)."""
        d = self.direction
        return (d is not None and vecs is not None and len(vecs) == len(d)
                and all(a is b for a, b in zip(vecs, d))
                and tuple(_version(t) for t in vecs) == self.versions)


def _version(t) -> int:
    return -1 if t is None else int(t._version)


def plan_for(active: Optional[Iterable[object]], step: Optional[int] = None) -> StepPlan:
    """The plan of step ``step`` whose active quantities are ``active`` (their order does not matter)."""
    stats, owner, direction, keep = set(), None, None, False
    for q in active or ():  # Quantity declares the three (quantities/base.py); the defaults ask for nothing
        keep = keep or bool(q.per_sample_keep(step))
        if direction is None:
            d = q.per_sample_direction(step)
            direction = tuple(d) if d is not None else None
        declared = set(q.per_sample_stats or ()) & STATS
        if "hist" in declared and q.hist_range is None:
            declared.discard("hist")  # no range to count with: that quantity counts on its own
        if "hist" in declared and owner is None:
            owner = q
        stats |= declared
    if owner is None:
        stats.discard("hist")
    if direction is not None:
        stats.add("dir")
        return StepPlan(frozenset(stats), owner, direction, tuple(_version(t) for t in direction), keep)
    return StepPlan(frozenset(stats), owner, keep=keep)


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
               zeros: Callable, p: torch.Tensor, d: Optional[torch.Tensor] = None,
               keep_left: Optional[list] = None) -> dict:
    """The statistics ``wanted`` (among "sq", "m2", "dots") of one parameter, and its histogram over
    [-R, R] where R is given, from one pass over each layer call's per-sample data.

    ``parts``: [(forward position, [ParamSamples, ...])] of the parameter; ``batch_sizes``: samples per
    forward; ``v``, ``d``: the vectors of "dots" and "dir" (g_i . v, g_i . d); ``zeros(b)``: [b] zeros on
    the parameter's device; ``keep_left`` ([floats]): the budget of blocks kept, returned under
    "blocks" ({forward position: [blocks]}) and taken off the budget.
    Returns {stat: value} with "hist" = (R, {forward position: (counts, max, clipped)}) for the calls
    counted in the pass: those that build their per-sample gradients anyway (no cheap maximum:
    convolutions, sequence Linear, fallback, weights shared within a forward); the others are counted
    on their own (``PerSampleView.histogram``), cheaply."""
    hist = R is not None
    extra = {"dir": d} if "dir" in wanted else {}
    own = wanted - {"dir"}  # the statistics ``fused_stats`` / ``factored_stats`` know by name
    got = dict(parts)
    pieces: Dict[str, list] = {s_: [] for s_ in wanted}
    counted: Dict[int, tuple] = {}
    kept: Dict[int, list] = {}
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
            if with_hist or any(ps.materializes(s_) for s_ in own):
                keep = None
                if keep_left is not None and b * ps.shape.numel() <= keep_left[0]:
                    keep_left[0] -= b * ps.shape.numel()
                    keep = kept[pos] = []
                res = ps.fused_stats(own | {"hist"} if with_hist else own, v, R, HIST_BINS, extra, keep=keep)
            else:
                res = ps.factored_stats(own, v)
                if extra:  # g_i . d the layer's own cheapest way (as PerSampleView.dots)
                    res["dir"] = ps.dots(d)
        else:  # weight sharing inside one forward: sum the calls' per-sample gradients, once
            with_hist = hist
            res = DenseSamples(summed(ps_list)).fused_stats(own | {"hist"} if hist else own, v, R, HIST_BINS, extra)
        if with_hist:
            counted[pos] = res["hist"]
        for s_ in wanted:
            pieces[s_].append(res[s_])
    out: dict = {"hist": (R, counted)} if hist else {}
    if kept:
        out["blocks"] = kept
    for s_ in wanted:
        if s_ == "m2":
            out[s_] = sum_parts(pieces[s_], p)
        else:
            out[s_] = pieces[s_][0] if len(pieces[s_]) == 1 else torch.cat(pieces[s_])
    return out


def summed(ps_list) -> torch.Tensor:
    """The per-sample gradients of a parameter used by several calls of one forward: their sum."""
    G = ps_list[0].materialize()
    for ps in ps_list[1:]:
        G = G + ps.materialize()
    return G


def sum_parts(parts, p):
    """The sum of a parameter's per-forward parts (None entries skipped), shaped like ``p``."""
    parts = [x for x in parts if x is not None]
    if not parts:
        return torch.zeros(p.shape, device=p.device)
    out = parts[0]
    for x in parts[1:]:
        out = out + x
    return out.reshape(p.shape)
