"""Per-step curvature objects shared by the quantities of one step (built once: ``StepContext.once``)."""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from ..rng import step_generator
from ..distributed import OutOfStep, shard_weight, sum_numbers, sum_tensors
from ..curvature import backpack_diag
from ..curvature.diagonal_check import disagreement
from ..curvature.batch_loss import BatchLoss, CurvatureUnavailable, rebuild
from ..curvature.hutchinson import hutchinson_trace
from ..curvature.hvp import GGNOperator, HessianOperator


def batch_loss(ctx, subbatch: Optional[int] = None) -> BatchLoss:
    return ctx.once(rebuild, subbatch)


def hessian(ctx, subbatch: Optional[int] = None, mode: str = "double_backward") -> HessianOperator:
    return ctx.once(_hessian, subbatch, mode)


def _hessian(ctx, subbatch: Optional[int], mode: str) -> HessianOperator:
    op = HessianOperator(batch_loss(ctx, subbatch), mode)
    if subbatch is None and getattr(op, "loss", None) is not None:
        check_reevaluation(ctx, op.loss)
    return across_processes(ctx, op, subbatch)


def check_reevaluation(ctx, loss: torch.Tensor, rtol: float = 1e-2) -> None:
    """The re-evaluated loss must be the loss the step trained on; otherwise the loss function was
    not fed the model output directly (e.g. ``out.logits``, a slice) nor called inside the model's forward,
    or the forward is not replayable.
    The tolerance is loose (1%) because training may run under autocast while the re-evaluation runs
    in the parameters' precision; feeding the loss something else changes it far more."""
    a = float(loss)
    if not math.isfinite(a):  # autograd's derivatives of log(x < 0) are finite: the solvers would not notice
        raise CurvatureUnavailable(f"the step's loss is {a} (not finite): its curvature is not defined")
    trained = ctx.loss()
    if trained is None:
        return
    b = float(trained)
    if not abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12):
        raise CurvatureUnavailable(
            f"re-evaluating the step gives loss {a:.6g}, but training computed {b:.6g}: the loss function must "
            "receive the model's output directly (or be called inside the model's forward), and the forward "
            "must be replayable from its inputs")


def ggn(ctx, subbatch: Optional[int] = None) -> GGNOperator:
    return ctx.once(_ggn, subbatch)


def _ggn(ctx, subbatch: Optional[int]) -> GGNOperator:
    op = GGNOperator(batch_loss(ctx, subbatch))
    if subbatch is None:
        check_reevaluation(ctx, torch.tensor(op.loss))
    return across_processes(ctx, op, subbatch)


class _AcrossProcesses:
    """v -> sum_r w_r A_r v: the curvature of the global batch of a data-parallel run from each
    process's operator A_r on its shard (w_r = its share of the samples for a mean loss, 1 for a
    sum); one reduction per product. Every process must apply it to the same vectors: the solvers are
    deterministic, their probes come from per-step seeds (``rng.step_generator``) and the eigenvalue's
    warm start is agreed (``HessMaxEV``)."""

    def __init__(self, op, weight: float, group):
        self.op, self.weight, self.group = op, weight, group
        self.params = op.params
        self.loss = getattr(op, "loss", None)

    @property
    def hvps(self) -> int:
        return self.op.hvps

    def __call__(self, v):
        return sum_tensors(self.group, [h * self.weight for h in self.op(v)], "curvature_product")

    def release(self) -> None:
        self.op.release()


def across_processes(ctx, op, subbatch: Optional[int] = None):
    """``op`` itself in one process; in a data-parallel run, the operator of the global batch."""
    group = ctx.watched.dist
    if group is None:
        return op
    return _AcrossProcesses(op, shard_weight(group, batch_loss(ctx, subbatch).num_samples or 0, ctx.reduction), group)


class ExactDiagonals:
    """Per-quantity holder of the BackPACK copy (created on first use; None when unsupported).

    A diagonal is handed out as exact only (1) for a model and loss that :func:`backpack_diag.unsupported_reason`
    accepts, (2) on a step whose targets :func:`backpack_diag.step_reason` accepts (else that step takes the
    estimators, the run keeps the exact path), and (3) once its first result agreed with the step's own
    curvature-vector products (:mod:`.diagonal_check`); a disagreement turns the exact path off for the run."""

    def __init__(self, float64: bool = False):
        self.float64 = float64  # BackPACK on a float64 copy (tic_diag: ratios with single diagonal entries)
        self.engine: Optional[backpack_diag.ExactDiagonal] = None
        self.reason: Optional[str] = None
        self.checked = False
        self.verified = set()  # kinds whose diagonal passed the cross-check

    def get(self, ctx, kind: str, subbatch: Optional[int] = None) -> Tuple[Optional[List[torch.Tensor]], str]:
        """(diagonal, method) or (None, reason) when BackPACK cannot handle the model."""
        w = ctx.watched
        if not self.checked:
            self.checked = True
            self.reason = backpack_diag.unsupported_reason(w.model, w.loss_fn)
            if self.reason is None:
                try:
                    self.engine = backpack_diag.ExactDiagonal(w.model, w.loss_fn, self.float64)
                except Exception as err:
                    self.reason = f"BackPACK could not extend a copy of the model: {err!r}"
        if self.engine is None:
            return None, self.reason
        dist = ctx.watched.dist
        skip = backpack_diag.step_reason(w.loss_fn, batch_loss(ctx, subbatch))
        if dist is not None:  # one decision for every process
            (n_skip,) = sum_numbers(dist, [skip is not None], "exact_diag_step")
            if n_skip and skip is None:
                skip = f"not exact on this step in {int(n_skip)} of {dist.size} processes"
        if skip is not None:
            return None, skip
        try:
            diag = ctx.once(self._exact, kind, subbatch)
        except _BackpackFailed as err:  # BackPACK cannot do it: the estimators take over for the run
            self.engine, self.reason = None, str(err)
            return None, self.reason
        if kind not in self.verified:
            wrong = ctx.once(self._cross_check, kind, subbatch)
            if wrong is not None:
                self.engine, self.reason = None, wrong
                return None, wrong
            self.verified.add(kind)
        return diag, backpack_diag.KINDS[kind]

    def _exact(self, ctx, kind: str, subbatch: Optional[int]) -> List[torch.Tensor]:
        """BackPACK's diagonal of the (global) batch; raises CurvatureUnavailable (this step) or
        _BackpackFailed (for the run), decided alike in every process."""
        dist = ctx.watched.dist
        diag, unavailable, failed = None, None, None
        try:
            diag = self.engine.compute(batch_loss(ctx, subbatch), kind)
            if subbatch is None:
                check_reevaluation(ctx, torch.tensor(self.engine.last_loss))
        except CurvatureUnavailable as err:  # this step only
            unavailable = err
        except OutOfStep:
            raise
        except Exception as err:
            failed = f"BackPACK failed ({type(err).__name__}: {err})"
        if dist is not None:  # one decision for every process, or their reductions would differ
            n_unavailable, n_failed = sum_numbers(dist, [unavailable is not None, failed is not None],
                                                  "exact_diag_ok")
            if n_failed and failed is None:
                failed = f"BackPACK failed in {int(n_failed)} of {dist.size} processes"
            if n_unavailable and unavailable is None and failed is None:
                unavailable = CurvatureUnavailable(f"unavailable in {int(n_unavailable)} of {dist.size} processes")
        if failed is not None:
            raise _BackpackFailed(failed)
        if unavailable is not None:
            raise unavailable
        if dist is not None:  # the global batch's diagonal: shards weighted
            w = shard_weight(dist, batch_loss(ctx, subbatch).num_samples or 0, ctx.reduction)
            diag = sum_tensors(dist, [d * w for d in diag], "exact_diag")
        return diag

    def _cross_check(self, ctx, kind: str, subbatch: Optional[int]) -> Optional[str]:
        """Whether BackPACK's diagonal disagrees with the operator's (once per run and kind; the products are
        made once per step for all the quantities asking)."""
        op = hessian(ctx, subbatch) if kind == "diag_h" else ggn(ctx, subbatch)
        bl = batch_loss(ctx, subbatch)
        return disagreement(ctx.once(self._exact, kind, subbatch), op, op.params, bl.trainable, ctx.names)


class _BackpackFailed(Exception):
    """BackPACK failed on the model: its diagonals are given up for the run."""


def hessian_trace_estimate(ctx, probes: int, seed: int, subbatch=None):
    """Hutchinson estimate of tr(H) with its standard error, probes from (seed, step): shared by the quantities
    of one step that ask for the same probes (hess_trace's default and the TIC fallback)."""
    return ctx.once(_hutchinson, probes, seed, subbatch)


def _hutchinson(ctx, probes: int, seed: int, subbatch: Optional[int]):
    op = hessian(ctx, subbatch)
    return hutchinson_trace(op, op.params, probes, step_generator(seed, ctx.step))
