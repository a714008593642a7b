"""Floors under issue 21's targets, timed in the same run as the variants they bound (``suite.measure``).

A floor is a training loop that does the plain step plus only tensor work the variant's quantities
cannot do without, written by hand without cockpit-lite's generality (no hooks, no checks, no NaN
reasons, no records). Its ratio to the plain step is a lower bound for any implementation of the
variant on that machine; where it is above a target, the target is out of reach there.

* ``mlp``, ``default`` and ``noise``: ``floor.py``'s hand-written minimal versions of the first-order
  and noise sets (three Linear layers; ``floor.py --check`` shows they log the same numbers).
* ``economy (default schedules)`` on any problem: the first-order set's tensor work every step
  (snapshot of theta, norms of g, theta and theta - theta_0 before the step, of the update after it,
  one host transfer). On the per-sample steps (one in ``PER_SAMPLE_EVERY``): each conv and sequence
  Linear layer's weight gradient once more (a lower bound for building its B per-sample gradients, which
  the noise statistics and the histogram need), and the count of the 1D histogram of the B x P
  per-sample gradient elements with the quantity's own counting kernel (``persample/samples.py``) on
  values made once at start (Linear layers on [b, in] inputs are left out: cockpit-lite counts them
  without forming the products). On the step after it, alpha's end point: g_i . d for each such
  layer, one product the size of its forward. Left out: the noise statistics themselves, attention's
  recomputation, alpha's projection at t, the records; so this is below what the preset costs. A faster
  exact counting kernel would lower it (reading the 4 B P bytes once is the machine's own floor).
"""

from __future__ import annotations

import itertools
import os
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn

from benchmarks import problems
from cockpit_lite import presets


class ScheduleFloor:
    """The plain loop of ``problem`` with the first-order work every step and, when ``count_every``, on
    every ``count_every``-th step the layers' weight gradients once more and the histogram count of the
    B x P values, on the step after it alpha's end-point projections (see the module docstring)."""

    def __init__(self, problem: problems.Problem, optimizer: str = "sgd", count_every: Optional[int] = None):
        from cockpit_lite.persample.samples import _histc

        torch.manual_seed(0)
        self.model = problem.make_model().to(problems.DEVICE)
        self.model.train(problem.train_mode)
        self.opt = problems.make_optimizer(self.model, optimizer)
        self.crit = nn.CrossEntropyLoss()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.index = {id(p): j for j, p in enumerate(self.params)}
        self.batches = itertools.cycle([problems.to_device(problem.make_batch(s, problem.batch_size)) for s in range(4)])
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]
            self.before = [torch.empty_like(p) for p in self.params]
        self.count_every, self.step_no, self._histc = count_every, 0, _histc
        self.blocks, self.R = [], 1.0
        self.io: Dict[nn.Module, list] = {}  # layer -> [input, output gradient] on the steps that need them
        self.unit: Optional[list] = None  # the last per-sample step's update / its norm (alpha's direction)
        if count_every:
            for m in self.model.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                    m.register_forward_hook(self._keep_io)
            g = torch.Generator().manual_seed(0)
            b = problem.batch_size
            factored = _factored_weights(self.model, next(self.batches)[0])
            self.blocks = [(torch.randn(b, *p.shape, generator=g) * 1e-3).to(problems.DEVICE) for p in self.params
                           if id(p) not in factored]
            self.R = 1.05 * max(float(x.abs().max()) for x in self.blocks)  # covers every value: no clipping pass

    def _phase(self) -> int:
        """0: a per-sample step, 1: the step after it (alpha's end point), else -1."""
        if not self.count_every:
            return -1
        k = self.step_no % self.count_every
        return k if k in (0, 1) else -1

    def _keep_io(self, module, inputs, output) -> None:
        x = inputs[0]
        if self._phase() < 0 or not output.requires_grad or (isinstance(module, nn.Linear) and x.dim() == 2):
            return
        slot = self.io[module] = [x.detach(), None]
        output.register_hook(lambda g: slot.__setitem__(1, g.detach()))

    def __call__(self) -> None:
        x, y = next(self.batches)
        phase = self._phase()
        self.io.clear()
        self.opt.zero_grad()
        self.crit(self.model(x), y).backward()
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            if phase == 0:  # the per-sample gradients: at least each layer's weight gradient once more
                for m, (X, D) in self.io.items():
                    _weight_grad(m, X, D)
            if phase == 1 and self.unit is not None:  # alpha's end point: g_i . d, one forward-sized product
                for m, (X, D) in self.io.items():
                    _projection(m, X, D, self.unit[self.index[id(m.weight)]])
            torch._foreach_copy_(self.before, self.params)
            norms = torch._foreach_norm(grads) + torch._foreach_norm(self.params) + torch._foreach_norm(
                torch._foreach_sub(self.params, self.theta0))
            self.opt.step()
            update = torch._foreach_sub(self.params, self.before)
            norms += torch._foreach_norm(update)
            values = torch.stack(norms).tolist()
            if phase == 0:
                t = sum(v * v for v in values[-len(update):]) ** 0.5
                self.unit = torch._foreach_div(update, t) if t > 0 else update
        if phase == 0:
            for X in self.blocks:
                self._histc(X, self.R, 100)
        self.step_no += 1

    def close(self) -> None:
        self.blocks = []


def _layer(m: nn.Module, X: torch.Tensor, D: torch.Tensor):
    """The layer's per-sample information as cockpit-lite holds it (no per-sample gradient built yet)."""
    from cockpit_lite.persample.conv import ConvWeightSamples
    from cockpit_lite.persample.linear import LinearWeightSamples

    if isinstance(m, nn.Linear):
        b = X.shape[0]
        return LinearWeightSamples(X.reshape(b, -1, X.shape[-1]), D.reshape(b, -1, D.shape[-1]))
    return ConvWeightSamples(m, X, D)


def _weight_grad(m: nn.Module, X: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The layer's ordinary (batched) weight gradient: a lower bound for building its B per-sample ones."""
    return _layer(m, X, D).total()


def _projection(m: nn.Module, X: torch.Tensor, D: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """[b] g_i . d for the layer's weight: one product the size of its forward (the layer's cheapest route)."""
    return _layer(m, X, D).dots(d)


def _factored_weights(model: nn.Module, x) -> set:
    """ids of the weights of Linear layers called on [b, in] inputs: cockpit-lite counts their histogram
    from the layer's inputs and output gradients without the B x P products (``outer_product_histogram``),
    so the floor leaves them out."""
    found, handles = set(), []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out: found.add(id(mod.weight)) if inp[0].dim() == 2 else None))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return found


def _minimal(kind: str):
    def make(problem, optimizer, tmp):
        from benchmarks import floor
        return floor._Minimal(problem, kind, optimizer, os.path.join(tmp, f"floor-{kind}-{optimizer}.jsonl"),
                              momentum=0.9 if optimizer == "sgd" else 0.0)
    return make


def _schedule(problem, optimizer, tmp):
    return ScheduleFloor(problem, optimizer, presets.PER_SAMPLE_EVERY)


#: (problem, variant) -> make(problem, optimizer, tmp dir) -> a step callable with ``close()``; the
#: default-schedule rows have a floor on every problem
FLOORS: Dict[Tuple[str, str], Callable] = {("mlp", "default"): _minimal("first-order"), ("mlp", "noise"): _minimal("noise")}
SCHEDULED = "economy (default schedules)"


def floor_for(problem: str, variant: str) -> Optional[Callable]:
    """The floor of a row, or None; floor.py's minimal versions run on the CPU only (not on a GPU run)."""
    if variant == SCHEDULED:
        return _schedule
    return None if problems.on_gpu() else FLOORS.get((problem, variant))


WHAT = {"default": "floor.py's hand-written first-order set", "noise": "floor.py's hand-written noise set",
        SCHEDULED: "first-order tensor work every step; on each per-sample step the layers' weight gradients once "
                   "more and the histogram count of the B x P values; alpha's end-point projection on the next"}
