"""``hess_max_ev``: largest algebraic eigenvalue of the mini-batch loss Hessian (Lanczos).

Records the Ritz value, ``hess_max_ev/error_bound`` (the residual ||H y - theta y||: an eigenvalue of H
lies within it; the true top eigenvalue is usually far closer, within bound^2 / gap) and, in the data,
``converged``: true only when that bound is within ``tol`` of the value (lanczos.py).

The bound is on the distance to *some* eigenvalue; it says the value is the top one only if the start
vector had a fair share of the top eigenvector. Two ways that failed, against ``eigvalsh`` of dense Hessians
(tests/curvature/test_unseen_curvature.py):

* the previous step's eigenvector as the start (a warm start): when the top two eigenvalues swap between
  steps, the old eigenvector is (nearly) an eigenvector of the new Hessian, its residual is tiny after one
  product, and the second eigenvalue was logged as converged (98 of 100 cases of a synthetic swap, 2% low).
  The warm start saved ~1 product of 30 per step (docs/benchmarks.md), so each step now starts from a
  fresh random vector (``step_generator(seed, step)``, the same in every process); ``warm_start=True``
  brings the old behaviour back;
* a random start on a near-degenerate top (a non-convex loss, spectrum [-4.7, 0.673], second eigenvalue
  0.668): a Ritz vector mixing the two top eigenvectors has a residual below ``tol`` * value while its value
  sits on the second one (9 of 200 random starts, 0.7% low, "converged"). Lanczos stops at
  ``STOP_MARGIN`` * ``tol`` (the mixture must then be almost pure; 0 of 200): ``converged`` means a
  residual within ``STOP_MARGIN`` * ``tol`` of the value (``stop_tol`` in the data), ~1.4x the products."""

from __future__ import annotations

from typing import Optional

import torch

from . import _curvature as curv
from ..curvature.batch_loss import CurvatureUnavailable
from ..curvature.hvp import flatten, unflatten
from ..curvature.lanczos import top_eigenvalue
from ..distributed import sum_numbers, sum_tensors
from ..rng import step_generator
from .base import Quantity

STOP_MARGIN = 0.1  # Lanczos stops on a residual of STOP_MARGIN * tol (see the module docstring)


class HessMaxEV(Quantity):
    name = "hess_max_ev"
    needs = frozenset({"model_inputs"})
    reads_theta = "all"  # the batch re-evaluated at theta_t (engine/param_versions.py)
    default_schedule = "log"
    description = ("largest algebraic Hessian eigenvalue (Lanczos, stops on the residual bound); "
                   "hess_max_ev/hvps, hess_max_ev/error_bound")

    def __init__(self, schedule=None, *, tol: float = 1e-3, max_iter: int = 40, subbatch: Optional[int] = None,
                 hvp_mode: str = "double_backward", seed: int = 0, warm_start: bool = False):
        super().__init__(schedule)
        self.warm_start = bool(warm_start)  # off by default: a swap of the top eigenvalues is missed
        self.tol, self.max_iter, self.subbatch, self.hvp_mode = tol, max_iter, subbatch, hvp_mode
        self.seed = seed
        self._v: Optional[torch.Tensor] = None  # previous eigenvector (warm start)

    def before_step(self, ctx):
        try:
            op = curv.hessian(ctx, self.subbatch, self.hvp_mode)
        except CurvatureUnavailable as err:
            ctx.emit_nan(self.name, str(err))
            return
        params = op.params
        n = sum(p.numel() for p in params)
        p0 = params[0]
        v0 = self._v if self.warm_start else None
        dist = ctx.watched.dist
        if dist is not None and self.warm_start:  # one warm start for all processes (each keeps its own copy of the last one)
            (everywhere,) = sum_numbers(dist, [v0 is not None and v0.numel() == n], "lanczos_warm_start")
            v0 = sum_tensors(dist, [v0], "lanczos_warm_start_vector")[0] / dist.size if everywhere == dist.size else None
        generator = step_generator(self.seed, ctx.step)
        frozen = [not p.requires_grad for p in ctx.watched.params]
        if any(frozen) and len(frozen) == len(params):
            # frozen parameters are constants (their Hessian rows are 0): a start without their coordinates
            # keeps the Krylov space in the trainable ones, so the eigenvalue is that of their Hessian
            if v0 is None or v0.numel() != n:
                v0 = torch.randn(n, generator=generator, dtype=p0.dtype)
            v0 = flatten([x * (0.0 if f else 1.0) for x, f in zip(unflatten(v0.to(p0.device), params), frozen)])
        try:
            res = top_eigenvalue(lambda x: flatten(op(unflatten(x, params))), n, v0=v0, tol=self.tol * STOP_MARGIN,
                                 max_iter=self.max_iter, generator=generator,
                                 dtype=p0.dtype, device=p0.device)
        except (FloatingPointError, CurvatureUnavailable) as err:  # (a product autograd cannot form)
            self._v = None
            ctx.emit_nan(self.name, str(err))
            return
        self._v = res.eigenvector.detach()
        # converged: the (rounding-floored) bound within tol of the value, the promise made for ``tol``
        converged = res.converged and res.error_bound <= self.tol * max(abs(res.eigenvalue), 1e-3 * res.scale)
        ctx.emit(self.name, res.eigenvalue)
        ctx.emit(f"{self.name}/hvps", res.hvps)
        ctx.emit(f"{self.name}/error_bound", res.error_bound)
        ctx.emit_data(self.name, {"converged": converged, "hvps": res.hvps, "method": "lanczos",
                                  "residual": res.residual, "error_bound": res.error_bound, "tol": self.tol,
                                  "stop_tol": self.tol * STOP_MARGIN, "warm_start": self.warm_start,
                                  "subbatch": self.subbatch})

    def close(self):
        self._v = None
