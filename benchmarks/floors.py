"""Floors under issue 21's targets, timed in the same run as the variants they bound (``suite.measure``).

A floor is a training loop that does the plain step plus only tensor work the variant's quantities
cannot do without, written by hand without cockpit-lite's generality (no hooks, no checks, no NaN
reasons, no records). Its ratio to the plain step is a lower bound for any implementation of the
variant on that machine; where it is above a target, the target is out of reach there.

* ``mlp``, ``default`` and ``noise``: ``floor.py``'s hand-written minimal versions of the first-order
  and noise sets (three Linear layers; ``floor.py --check`` shows they log the same numbers).
* ``<preset> (default schedules)`` on any problem: the first-order set's tensor work every step
  (snapshot of theta, norms of g, theta and theta - theta_0 before the step, of the update after it,
  one host transfer) and, on the per-sample steps (one in ``PER_SAMPLE_EVERY``), the count of the 1D
  histogram of the B x P per-sample gradient elements, with the quantity's own counting kernel
  (``persample/samples.py``) on values made once at start (but for Linear layers on [b, in] inputs,
  whose histogram cockpit-lite counts without forming the products). Building the per-sample gradients, the noise
  statistics and alpha's projections are left out, so this is below what the preset costs; a faster
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
    """The plain loop of ``problem`` with the first-order work every step and, when ``count_every``, the
    histogram count of B x P values every ``count_every`` steps (see the module docstring)."""

    def __init__(self, problem: problems.Problem, optimizer: str = "sgd", count_every: Optional[int] = None):
        from cockpit_lite.persample.samples import _histc

        torch.manual_seed(0)
        self.model = problem.make_model().to(problems.DEVICE)
        self.model.train(problem.train_mode)
        self.opt = problems.make_optimizer(self.model, optimizer)
        self.crit = nn.CrossEntropyLoss()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = itertools.cycle([problems.to_device(problem.make_batch(s, problem.batch_size)) for s in range(4)])
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]
            self.before = [torch.empty_like(p) for p in self.params]
        self.count_every, self.step_no, self._histc = count_every, 0, _histc
        self.blocks, self.R = [], 1.0
        if count_every:
            g = torch.Generator().manual_seed(0)
            b = problem.batch_size
            factored = _factored_weights(self.model, next(self.batches)[0])
            self.blocks = [(torch.randn(b, *p.shape, generator=g) * 1e-3).to(problems.DEVICE) for p in self.params
                           if id(p) not in factored]
            self.R = 1.05 * max(float(x.abs().max()) for x in self.blocks)  # covers every value: no clipping pass

    def __call__(self) -> None:
        x, y = next(self.batches)
        self.opt.zero_grad()
        self.crit(self.model(x), y).backward()
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.before, self.params)
            norms = torch._foreach_norm(grads) + torch._foreach_norm(self.params) + torch._foreach_norm(
                torch._foreach_sub(self.params, self.theta0))
            self.opt.step()
            norms += torch._foreach_norm(torch._foreach_sub(self.params, self.before))
            torch.stack(norms).tolist()
        if self.count_every and self.step_no % self.count_every == 0:
            for X in self.blocks:
                self._histc(X, self.R, 100)
        self.step_no += 1

    def close(self) -> None:
        self.blocks = []


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
    if variant == SCHEDULED:
        return _schedule
    return FLOORS.get((problem, variant))


WHAT = {"default": "floor.py's hand-written first-order set", "noise": "floor.py's hand-written noise set",
        SCHEDULED: "first-order tensor work every step + counting the histogram of the B x P values on each "
                   "per-sample step (no per-sample gradients built)"}
