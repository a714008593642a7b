"""Shared body of ``hess_trace`` and ``ggn_trace``: exact diagonal via BackPACK, else Hutchinson / Hutch++."""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import _curvature as curv
from ..curvature.batch_loss import CurvatureUnavailable
from ..curvature.hutchinson import hutchinson_trace, hutchpp_trace
from .base import Quantity
from ..rng import step_generator

METHODS = ("auto", "exact", "hutchinson", "hutch++")


class TraceQuantity(Quantity):
    needs = frozenset({"model_inputs"})
    reads_theta = "all"  # the batch re-evaluated at theta_t (engine/param_versions.py)
    default_schedule = "log"
    kind = ""  # "diag_h" or "diag_ggn"

    def __init__(self, schedule=None, *, method: str = "auto", probes: int = 10, subbatch: Optional[int] = None,
                 seed: int = 0):
        super().__init__(schedule)
        if method not in METHODS:
            raise ValueError(f"{self.name}: method must be one of {METHODS}, got {method!r}")
        self.method, self.probes, self.subbatch = method, int(probes), subbatch
        self.seed = seed  # probes of step t from (seed, t): the same in every process (rng.step_generator)
        self.exact = curv.ExactDiagonals()

    def operator(self, ctx):
        raise NotImplementedError

    def before_step(self, ctx):
        name = self.name
        op = None
        try:
            fallback = None
            if self.method in ("auto", "exact"):
                diag, how = self.exact.get(ctx, self.kind, self.subbatch)
                if diag is not None and not all(bool(torch.isfinite(d).all()) for d in diag):
                    ctx.emit_nan(name, f"the exact diagonal ({how}) is not finite")
                    return
                if diag is not None:
                    per = [d.sum() for d in diag]
                    ctx.emit(name, torch.stack([x.double() for x in per]).sum())
                    ctx.emit(f"{name}/stderr", 0.0)
                    for pname, x in zip(ctx.names, per):
                        ctx.emit(f"{name}/{pname}", x)
                    ctx.emit_data(name, {"method": how, "probes": 0, "subbatch": self.subbatch})
                    return
                if self.method == "exact":
                    ctx.emit_nan(name, f"exact trace unavailable: {how}")
                    return
                fallback = how
            if self.method == "hutch++":
                op = self.operator(ctx)
                est = hutchpp_trace(op, op.params, self.probes, step_generator(self.seed, ctx.step))
            elif self.kind == "diag_h":  # shared with the TIC fallback when the probes are the same
                est = curv.hessian_trace_estimate(ctx, self.probes, self.seed, self.subbatch)
            else:
                op = self.operator(ctx)
                est = hutchinson_trace(op, op.params, self.probes, step_generator(self.seed, ctx.step))
        except CurvatureUnavailable as err:
            ctx.emit_nan(name, str(err))
            return
        if not (math.isfinite(est.total) and math.isfinite(est.stderr)):
            ctx.emit_nan(name, f"the {est.method} estimate is not finite ({est.total} +- {est.stderr})")
            return
        ctx.emit(name, est.total)
        ctx.emit(f"{name}/stderr", est.stderr)
        if est.per_block is not None:
            for pname, x in zip(ctx.names, est.per_block):
                ctx.emit(f"{name}/{pname}", x)
        data = {"method": est.method, "probes": est.probes, "subbatch": self.subbatch}
        if est.per_block_stderr is not None:  # the per-parameter values are estimates too: their standard errors
            data["stderr_per_parameter"] = dict(zip(ctx.names, est.per_block_stderr))
        if self.kind == "diag_ggn" and getattr(op, "split", "loss input") != "loss input":
            data["ggn_split"] = op.split  # e.g. at the logits, before a LogSoftmax module
        if fallback:
            data["exact_unavailable"] = fallback
        ctx.emit_data(name, data)
