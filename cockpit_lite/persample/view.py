"""``PerSampleView``: per-sample statistics of one step, from the captured layer inputs/output grads.

g_i = grad l_i, the gradient of sample i's loss (see ``losses.py`` for l_i), for the n samples of all
micro-batches of the step. It does not depend on the loss reduction, on a 1/k the user applied for
gradient accumulation or on an AMP loss scale: each micro-batch's captured output gradients are
multiplied by b_k / s_k (mean reduction) or 1 / s_k (sum), with s_k the gradient that arrived at
the loss output (``MicroBatch.loss_scale``) and b_k its number of samples.

Statistics are computed per parameter with the cheapest route its layer rule offers (factored where
possible, one layer materialized at a time otherwise) and cached for the step. What the step's
quantities need is decided once, up front (``plan.py``), so each layer's per-sample data is built at
most once per step, in one pass that yields every planned statistic, whatever the quantities' order.
A parameter whose per-sample information is not available gets NaN values and a reason in
``unsupported()``.
"""

from __future__ import annotations

import math

from typing import Dict, List, Optional

import torch

from ..distributed import sum_numbers
from .losses import LossUnavailable, per_sample_losses
from .rules import FallbackFailed, Unsupported, layer_samples
from .plan import HIST_BINS, KEEP_FLOATS, hist_range as plan_hist_range, layer_pass, plan_for, sum_parts, summed as _summed
from .mean_grad import check as check_mean, mean_grad
from .underflow import underflow_reason
from .samples import DenseSamples, to_float
from .view_setup import resolve_replays, setup


class PerSampleView:
    def __init__(self, inputs):
        """``inputs``: the step's inputs (``StepContext.inputs()``), never the context itself, which keeps
        this view: a reference back would make a cycle holding the step's captured activations."""
        self.inputs = inputs
        self.params: List[torch.Tensor] = list(inputs.params)
        self.names: List[str] = list(inputs.names)
        self._index = {id(p): j for j, p in enumerate(self.params)}
        self._reasons: Dict[str, str] = {}
        #: the parameters among them whose only reason is a gradient too small for float32 statistics (underflow.py):
        #: the gradient tests' totals may leave them out (quantities/_noise.tiny_left_out)
        self.tiny: Dict[str, str] = {}
        self._global_reason: Optional[str] = None
        self._cache: Dict[object, object] = {}
        self._samples = {}  # (call order) -> {param index: ParamSamples}
        self._replay: Dict[int, str] = {}  # parameters for the per-sample replay -> why no layer rule serves
        self._replayed: Dict[int, list] = {}  # their [(forward position, [DenseSamples])]
        self._setup(inputs.layer_io)

    def _setup(self, captured) -> None:
        setup(self, captured)  # view_setup.py

    @property
    def n(self) -> int:
        """Samples of the step: of the global batch in a data-parallel run (``inputs.watched.dist``), else n_local."""
        if "n" not in self._cache:
            dist = self.inputs.watched.dist
            self._cache["n"] = self.n_local if dist is None else int(sum_numbers(dist, [self.n_local])[0])
        return self._cache["n"]

    def unsupported(self) -> Dict[str, str]:
        """Parameter name -> reason its per-sample information is unavailable on this step."""
        self._touch_all()
        return dict(self._reasons)

    def _touch_all(self) -> None:
        if "touched" in self._cache:
            return
        self._cache["touched"] = True
        if self._global_reason is None:
            for j in range(len(self.params)):
                self._param_samples(j)
            check_mean(self)  # .grad against the per-sample gradients' mean (mean_grad.py)

    # -- per-call layer rules -----------------------------------------------------------------------
    def _call_samples(self, pos: int, call):
        key = (pos, call.order)
        if key not in self._samples:
            factor = self.factors[pos].to(call.output_grad.device)
            try:
                out = layer_samples(call, call.output_grad, self.batch_sizes[pos], factor)
            except Unsupported as err:
                # kept without its traceback (as engine/calls.Outcome.fail does): the traceback holds this frame and
                # so this view, which holds the error: a reference cycle that kept each step's layer calls (their
                # inputs and output gradients) alive until the cyclic collector ran (an LSTMCell loop: 6 per step)
                out = err.with_traceback(None)
            self._samples[key] = out
        return self._samples[key]

    def _param_samples(self, j: int):
        """[(forward position, [ParamSamples, ...])] for parameter j, or None when unavailable."""
        if self.names[j] in self._reasons:
            return None
        if j in self._replayed:
            return self._replayed[j]
        ck = ("ps", j)
        if ck in self._cache:
            return self._cache[ck]
        per_pos: Dict[int, list] = {}
        for pos, call, attr in self.feeds[j]:
            got = self._call_samples(pos, call)
            if isinstance(got, FallbackFailed) and self._replay_instead(call, str(got)):
                return self._replayed[j]
            if isinstance(got, Exception):
                self._reasons.setdefault(self.names[j], str(got))  # (a failed replay's reason names both)
                self._cache[ck] = None
                return None
            per_pos.setdefault(pos, []).append(got[attr])
        out = sorted(per_pos.items())
        self._cache[ck] = out
        return out

    def _replay_instead(self, call, why: str) -> bool:
        """Whether the parameters fed by ``call``, a module vmap could not trace (a cell fed a state expanded from a
        learned table), now come from the per-sample replay of the model (``replayed.py``: a loop where vmap fails,
        checked against the step's per-sample losses); else they carry both reasons."""
        fed = {j: why for j, feeds in self.feeds.items() if any(c is call for _, c, _ in feeds)
               and self.names[j] not in self._reasons and j not in self._replayed}
        resolve_replays(self, fed)
        return all(j in self._replayed for j in fed)

    def _per_forward(self, j: int, single, dense, empty, at: bool = False):
        """Apply ``single(ps)`` (one call in the forward; ``single(ps, pos)`` with ``at``) or ``dense(G)``
        (summed materialized calls: weight sharing) per forward; ``empty(b)`` for forwards where the
        parameter was not used."""
        parts = self._param_samples(j)
        if parts is None:
            return None
        got = dict(parts)
        out = []
        for pos, b in enumerate(self.batch_sizes):
            ps_list = got.get(pos)
            if not ps_list:
                out.append(empty(b))
            elif len(ps_list) == 1:
                out.append(single(ps_list[0], pos) if at else single(ps_list[0]))
            else:
                out.append(dense(_summed(ps_list)))
        return out

    def _nan(self, shape) -> torch.Tensor:
        return torch.full(shape, float("nan"), device=self.params[0].device)

    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(*shape, device=self.params[0].device)

    # -- public API ---------------------------------------------------------------------------------
    def losses(self) -> torch.Tensor:
        """[n] per-sample losses l_i (see ``losses.py``); NaN with a reason when unavailable."""
        if "losses" not in self._cache:
            try:
                if self._global_reason is not None:
                    raise LossUnavailable(self._global_reason)
                parts = [per_sample_losses(self.inputs.watched.loss_fn, mb, b, self.reduction, self.sample_dim) * share
                         for mb, b, share in zip(self.micro_batches, self.batch_sizes, self.shares)]
                self._cache["losses"] = torch.cat(parts)
            except LossUnavailable as err:
                self._cache["losses_reason"] = str(err)
                self._cache["losses"] = self._nan((self.n_local,))
        return self._cache["losses"]

    def losses_reason(self) -> Optional[str]:
        self.losses()
        return self._cache.get("losses_reason")

    def sq_norms_per_param(self) -> List[torch.Tensor]:
        """||g_i||^2 per parameter, [n] each, in the order of inputs.params."""
        return [self._stat(j, "sq") for j in range(len(self.params))]

    def rounding_floors(self) -> torch.Tensor:
        """[params] float64: sum_i ||sum_t |terms_it| ||^2 of the per-sample gradients that are sums over
        positions (``DenseSamples.floor_sq``), NaN where unknown; this process's samples."""
        if "floors" not in self._cache:
            out = torch.full((len(self.params),), math.nan, dtype=torch.float64, device=self.params[0].device)
            known, values = [], []
            for j in range(len(self.params)):
                parts = self._param_samples(j) or []
                floors = [ps_list[0].floor_sq() if len(ps_list) == 1 and hasattr(ps_list[0], "floor_sq") else None
                          for _, ps_list in parts]
                if floors and all(f is not None for f in floors):
                    known.append(j)
                    values.append(sum(floors))
            if known:
                out[known] = torch.stack(values).to(out.device)
            self._cache["floors"] = out
        return self._cache["floors"]

    def sq_norms(self) -> torch.Tensor:
        """||g_i||^2 over all observed parameters, [n]."""
        if "sq_total" not in self._cache:
            self._cache["sq_total"] = torch.stack(self.sq_norms_per_param()).sum(0)
        return self._cache["sq_total"]

    def dots_per_param(self, vecs) -> List[torch.Tensor]:
        """g_i . v per parameter ([n] each); ``vecs`` aligned with inputs.params (None = zero). The direction
        the step's plan names (alpha's) comes from the step's shared pass."""
        out = []
        planned = self.plan().serves(vecs)
        for j, v in enumerate(vecs):
            if v is None:
                out.append(self._zeros(self.n_local) if self.names[j] not in self._reasons else self._nan((self.n_local,)))
                continue
            if planned:
                out.append(self._stat(j, "dir"))
                continue
            vf = to_float(v.detach())
            kept = self._cache.get(("kept", j), {})  # conv blocks the step's pass kept (plan.py)
            parts = self._per_forward(j, lambda ps, pos: ps.kept_dots(kept[pos], vf) if pos in kept else ps.dots(vf),
                                      lambda G: G.reshape(G.shape[0], -1) @ vf.reshape(-1).to(G.dtype), self._zeros,
                                      at=True)
            out.append(self._nan((self.n_local,)) if parts is None else torch.cat(parts))
        return out

    def dots(self, vecs) -> torch.Tensor:
        return torch.stack(self.dots_per_param(vecs)).sum(0)

    def second_moment(self) -> List[torch.Tensor]:
        """sum_i g_ij^2 per parameter, shaped like the parameter."""
        return [self._stat(j, "m2") for j in range(len(self.params))]

    def dots_mean_per_param(self) -> List[torch.Tensor]:
        """g_i . g per parameter ([n] each), g = mean_grad(); fused with the other per-layer passes."""
        return [self._stat(j, "dots") for j in range(len(self.params))]

    # -- fused per-parameter statistics (the step's plan: plan.py) -----------------------------------
    def plan(self):
        """What the step's active quantities need from the per-sample data (``plan.StepPlan``), decided
        once per step, before any of them runs."""
        if "plan" not in self._cache:
            self._cache["plan"] = plan_for(getattr(self.inputs, "active", None), getattr(self.inputs, "step", None))
        return self._cache["plan"]

    def _planned(self) -> frozenset:
        """Statistics the step's active quantities declared (``per_sample_stats``), to share passes."""
        return self.plan().stats

    def _hist_range(self) -> Optional[float]:
        """R of the planned shared histogram pass, or None (none planned, or not finite)."""
        if "hist_R" not in self._cache:
            self._cache["hist_R"] = plan_hist_range(self.plan(), self)
        return self._cache["hist_R"]

    def _stat(self, j: int, stat: str):
        """Statistic ``stat`` of parameter j; the first request computes every planned one in one pass over
        each layer's per-sample data ("hist": (R, {forward position: (counts, max, clipped)}) for the
        layers counted in that pass; the others are counted in ``histogram``)."""
        have = self._cache.setdefault(("stat", j), {})
        if stat not in have:
            self._run_pass(j, ({stat} | self._planned()) - set(have), have)
        return have[stat]

    def _run_pass(self, j: int, wanted: set, have: dict) -> None:
        p = self.params[j]
        R = self._hist_range() if "hist" in wanted else None
        wanted = wanted - {"hist"}
        parts = self._param_samples(j)
        if parts is None:
            for s_ in wanted:
                have[s_] = self._nan((self.n_local,)) if s_ in ("sq", "dots", "dir") else self._nan(p.shape)
            if R is not None:
                have["hist"] = (R, {})
            return
        v = self.mean_grad()[j] if "dots" in wanted else None
        d = None
        if "dir" in wanted:
            d = self.plan().direction[j]
            d = to_float(d.detach()) if d is not None else self._zeros(p.shape)
        keep_left = None
        if self.plan().keep:
            keep_left = self._cache.setdefault("keep_left", [KEEP_FLOATS])
        got = layer_pass(parts, self.batch_sizes, wanted, v, R, self._zeros, p, d, keep_left)
        why = underflow_reason(self, j)
        if why is not None and self.names[j] not in self._reasons:
            self._reasons[self.names[j]] = self.tiny[self.names[j]] = why
        if "blocks" in got:
            self._cache[("kept", j)] = got.pop("blocks")
        have.update(got)

    def sum_grads(self) -> List[torch.Tensor]:
        """sum_i g_i per parameter (n times the mean gradient), from the per-sample information."""
        if "sum" not in self._cache:
            out = []
            for j, p in enumerate(self.params):
                parts = self._per_forward(j, lambda ps: ps.total(), lambda G: G.sum(0), lambda b: None)
                out.append(self._nan(p.shape) if parts is None else sum_parts(parts, p))
            self._cache["sum"] = out
        return self._cache["sum"]

    def mean_grad(self) -> List[torch.Tensor]:
        """g = (1/n) sum_i g_i per parameter (over the global batch in a data-parallel run): ``.grad`` times
        a checked factor, or the per-sample sums (mean_grad.py)."""
        return mean_grad(self)

    def per_sample_grads(self, index: int) -> torch.Tensor:
        """[n, *shape] per-sample gradients of parameter ``index`` (the caller frees it)."""
        p = self.params[index]
        parts = self._per_forward(index, lambda ps: ps.materialize(), lambda G: G,
                                  lambda b: torch.zeros(b, *p.shape, device=p.device))
        if parts is None:
            return self._nan((self.n_local, *p.shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def chunks(self, index: int):
        """Per-sample gradients of parameter ``index`` as blocks [b', *shape] (all samples, in order)."""
        parts = self._param_samples(index)
        p = self.params[index]
        if parts is None:
            yield self._nan((self.n_local, *p.shape))
            return
        got = dict(parts)
        for pos, b in enumerate(self.batch_sizes):
            ps_list = got.get(pos)
            if not ps_list:
                yield torch.zeros(b, *p.shape, device=p.device)
            elif len(ps_list) == 1:
                yield from ps_list[0].chunks()
            else:
                yield _summed(ps_list)

    def histogram(self, index: int, R: float, bins: int):
        """(counts [bins] float64, max |g_ik|, clipped) of parameter ``index``'s per-sample gradient
        elements over [-R, R] (values outside counted in the edge bins), one layer at a time. Where the
        step's plan counts this range in its shared pass, the layers built there are not built again."""
        parts = self._param_samples(index)
        p = self.params[index]
        counts = torch.zeros(bins, dtype=torch.float64)
        top, clipped = 0.0, 0
        got = dict(parts or [])
        fused: Dict[int, tuple] = {}
        if parts is not None and bins == HIST_BINS and self._hist_range() == R:
            done = self._stat(index, "hist")  # runs the planned pass if no quantity has yet
            fused = done[1] if done[0] == R else {}
        for pos, b in enumerate(self.batch_sizes):
            ps_list = got.get(pos)
            if not ps_list:  # the parameter was not used in this micro-batch: b * numel zeros
                counts[bins // 2] += b * p.numel()
                continue
            if pos in fused:
                c, m, k = fused[pos]
            elif len(ps_list) == 1:
                c, m, k = ps_list[0].histogram(R, bins)
            else:
                c, m, k = DenseSamples(_summed(ps_list)).histogram(R, bins)
            counts += c
            top = max(top, m)
            clipped = -1 if (k < 0 or clipped < 0) else clipped + k
        return counts, top, clipped

    def max_abs_per_param(self) -> List[torch.Tensor]:
        """max_i,k |g_i,k| per parameter (0-d), cheap where the layer has a factored form."""
        out = []
        for j in range(len(self.params)):
            parts = self._per_forward(j, lambda ps: ps.max_abs(), lambda G: G.abs().max(),
                                      lambda b: self._zeros(()))
            out.append(self._nan(()) if parts is None else torch.stack([x.reshape(()) for x in parts]).max())
        return out

    def cheap_max_abs_per_param(self) -> List[Optional[torch.Tensor]]:
        """max_ik |g_i,k| per parameter where the layer gives it without materializing (else None)."""
        if "cheap_max" in self._cache:
            return self._cache["cheap_max"]
        out = []
        for j in range(len(self.params)):
            parts = self._param_samples(j)
            if parts is None or any(len(l) != 1 or not getattr(l[0], "cheap_max", False) for _, l in parts):
                out.append(None)
                continue
            vals = [l[0].max_abs().reshape(()) for _, l in parts]
            out.append(torch.stack(vals).max() if vals else self._zeros(()))
        self._cache["cheap_max"] = out
        return out
