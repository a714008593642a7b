"""Shared test support: the user's training loop, watched by a cockpit.

One loop for the test files that each carried a private copy: ``opt.zero_grad()``, forward and
backward over the micro-batches of a step (``loss / accumulate`` when accumulating), optional
clipping, ``opt.step()``, optional scheduler; the parameters are copied at the start of every step.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

import cockpit_lite
from cockpit_lite.quantities.base import Quantity


@dataclass
class Trained:
    #: the run log read back (``cockpit_lite.load``); None when nothing was watched
    run: Any
    #: ``{name: parameter}`` at the start of every optimizer step, then after the last one
    thetas: List[Dict[str, torch.Tensor]] = field(default_factory=list)
    #: the (closed) cockpit; None when nothing was watched
    cockpit: Any = None


def _theta(model) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def watched_training(model, opt, loss_fn, batches: Iterable[Tuple[Any, Any]], logdir=None, *, accumulate: int = 1,
                     divide: bool = True, clip: Optional[float] = None, scheduler=None, forward=None,
                     before_step: Optional[Callable[[int], None]] = None,
                     after_backward: Optional[Callable[[int], None]] = None, **watch_options) -> Trained:
    """Train ``model`` on ``batches`` (``(x, y)`` pairs; ``accumulate`` of them per optimizer step, each
    loss divided by ``accumulate`` unless ``divide=False``),
    watched by ``cockpit_lite.watch(forward or model, opt, loss_fn=loss_fn, logdir=logdir, **watch_options)``
    when ``logdir`` is given. ``before_step(k)`` runs before step ``k``'s ``zero_grad``,
    ``after_backward(k)`` after its backward passes (before clipping and ``opt.step()``)."""
    batches = list(batches)
    forward = forward or model
    watching = logdir is not None
    cockpit = cockpit_lite.watch(forward, opt, loss_fn=loss_fn, logdir=logdir, **watch_options) if watching else None
    thetas = []
    with cockpit if watching else contextlib.nullcontext():
        for k, start in enumerate(range(0, len(batches), accumulate)):
            thetas.append(_theta(model))
            if before_step is not None:
                before_step(k)
            opt.zero_grad()
            for x, y in batches[start:start + accumulate]:
                loss = loss_fn(forward(x), y)
                (loss / accumulate if divide and accumulate > 1 else loss).backward()
            if after_backward is not None:
                after_backward(k)
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if scheduler is not None:
                scheduler.step()
        thetas.append(_theta(model))
    return Trained(cockpit_lite.load(cockpit.logdir) if watching else None, thetas, cockpit)


def wait_for_processes(procs, what: str = "a worker process", timeout: float = 240) -> List[str]:
    """The outputs of ``subprocess.Popen`` workers (stdout with stderr), each of which must exit 0; on a
    timeout every worker is killed and the test fails (a collective waited for a process that never came)."""
    import pytest

    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except Exception:  # subprocess.TimeoutExpired
            for q in procs:
                q.kill()
            pytest.fail(f"{what} did not finish within {timeout} s")
        assert p.returncode == 0, out
        outs.append(out)
    return outs


class Probe(Quantity):
    """A quantity that keeps what the step's ``PerSampleView`` answers, for tests to compare with a
    brute force: ``n``, ``unsupported`` (parameter -> reason), ``losses`` and ``losses_reason``, ``G``
    (per-sample gradients per parameter), ``sq`` (per parameter) and ``sq_total``; with ``full=True``
    also ``mean``, ``dots`` (onto the mean), ``m2``, ``sums`` and ``cheap`` (cheap max |g|)."""

    name = "probe"
    needs = frozenset({"layer_io"})

    def __init__(self, schedule=None, full: bool = False):
        super().__init__(schedule)
        self.full = full

    def before_step(self, ctx):
        v = ctx.per_sample
        self.n = v.n
        self.unsupported = v.unsupported()
        self.losses = v.losses().clone()
        self.losses_reason = v.losses_reason()
        self.G = [v.per_sample_grads(j).clone() for j in range(len(ctx.params))]
        self.sq = [s.clone() for s in v.sq_norms_per_param()]
        self.sq_total = v.sq_norms().clone()
        if self.full:
            self.mean = [g.clone() for g in v.mean_grad()]
            self.dots = [d.clone() for d in v.dots_per_param(self.mean)]
            self.m2 = [m.clone() for m in v.second_moment()]
            self.sums = [s.clone() for s in v.sum_grads()]
            self.cheap = [None if c is None else float(c) for c in v.cheap_max_abs_per_param()]


def written_run(logdir, values: List[Dict[str, Any]], data: Optional[Dict[str, Any]] = None):
    """The run of a log written by hand into ``logdir``: steps 0, 1, ... with ``values[step]`` (and ``data``, the
    same on every step, when given), closed."""
    from cockpit_lite.runlog import RunLogWriter

    w = RunLogWriter(logdir, {})
    for step, vals in enumerate(values):
        w.write({"type": "step", "step": step, "values": vals, **({"data": data} if data is not None else {})})
    w.close()
    return cockpit_lite.load(logdir)
