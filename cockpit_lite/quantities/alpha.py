"""``alpha``: where the step landed on a noise-aware parabola fitted along the update, for any optimizer.

alpha of step t needs two observations along the update d = theta_{t+1} - theta_t:

* at tau = 0 (step t): the mini-batch loss f0 and the per-sample losses' variance (``before_step``),
  then, once the optimizer has stepped, t = ||d|| and the per-sample projections g_i . d/||d|| at
  theta_t (``after_step``; the per-sample data of step t's backward pass do not depend on theta);
* at tau = t (step t+1, a new batch at theta_{t+1}): its loss, loss variance, and the projections of its
  per-sample gradients onto the same direction (``before_step`` of step t+1).

The fit (``cockpit_lite.alpha_fit.fit_alpha``) runs at step t+1 and is written into step t's record
(``ctx.emit_for_step``). The only state kept between the two steps is the unit direction d/||d||
(one buffer the size of the parameters) and a few scalars: O(P) memory, whatever the optimizer
(momentum, Adam, weight decay, clipping, schedulers, several param groups: d is simply what the
optimizer did).

f0 and f1 are the means of the per-sample losses of all micro-batches of the step: the mini-batch
loss for ``reduction="mean"`` (also with gradient accumulation). For ``reduction="sum"`` the fit is
made on the mean as well, which leaves alpha unchanged (scaling the objective scales w1 and w2 alike)
and keeps f and f' (means of the per-sample slopes) on the same scale.

Schedules: a step is observed when the schedule is due on it (as a start) or on the step before
(as an end), so "every:10" observes steps 10 and 11, 20 and 21, ... . If the end step is skipped
(e.g. a GradScaler found inf/NaN gradients) or not observed, alpha of the start step is NaN with
the reason, written on the next observed step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..alpha_fit import alpha_stderr, fit_alpha
from ..distributed import mean_and_var, means_and_vars
from . import _moved
from .base import Quantity


@dataclass
class _Start:
    """What step ``step`` (the start of the fit) left for the next step."""

    step: int
    n: int
    f: torch.Tensor  # 0-d: mean of the per-sample losses
    var_f: torch.Tensor
    t: Optional[torch.Tensor] = None  # ||d||, known after the step
    df: Optional[torch.Tensor] = None
    var_df: Optional[torch.Tensor] = None
    after: Optional[torch.Tensor] = None  # the parameters' norms after the step (_moved.py)
    others: Optional[torch.Tensor] = None  # norms of the model's parameters another optimizer trains, at theta_t
    # parameters without a gradient on the step (frozen, not reached by backward) and the norms of their parts
    # of d: their slope is not observed, so d must not move them (_unobserved_slope)
    frozen: Optional[Tuple[List[str], torch.Tensor]] = None


def _frozen_parts(ctx, norms=None, direction=None) -> Optional[Tuple[List[str], torch.Tensor]]:
    """(names, float64 norms of their parts of d) of the step's parameters without a gradient (the per-sample
    view's ``frozen``), or None where every parameter has one (no tensor work then)."""
    frozen = sorted(getattr(ctx.per_sample_if_built(), "frozen", None) or ())
    if not frozen or (norms is None and direction is None):
        return None
    with torch.no_grad():
        parts = [norms[j] for j in frozen] if norms is not None else torch._foreach_norm([direction[j] for j in frozen])
        return [ctx.names[j] for j in frozen], torch.stack([x.double() for x in parts])


def _unobserved_slope(frozen, flags) -> List[str]:
    """Names of parameters without a gradient whose part of d is not zero, from the transferred norms."""
    out, at = [], 0
    for names, _ in frozen:
        out += [n for n, x in zip(names, flags[at:at + len(names)]) if x > 0]
        at += len(names)
    return sorted(set(out))


class _Unmeasurable(Exception):
    """A reason why alpha cannot be measured on this step (recorded as NaN with the reason)."""


def loss_observation(per_sample, stats: Optional[dict] = None, along: Optional[torch.Tensor] = None
                     ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, unbiased variance) of the per-sample losses l_i. ``stats``: a dict that keeps them for
    the step, so that the end point of one fit and the start of the next share one reduction; ``along``:
    per-sample values whose (mean, variance) are reduced with the losses, into ``stats["along"]``."""
    stats = {} if stats is None else stats
    if "losses" not in stats or (along is not None and "along" not in stats):
        losses = per_sample.losses().detach()
        reason = per_sample.losses_reason() if hasattr(per_sample, "losses_reason") else None
        # over the global batch of a data-parallel run, in one reduction
        got = means_and_vars(_group(per_sample), [losses] if along is None else [losses, along])
        stats["losses"] = (*got[0], reason)
        if along is not None:
            stats["along"] = got[1][1:]
    n, mean, var, reason = stats["losses"]
    if reason:
        raise _Unmeasurable(f"per-sample losses are not available: {reason}")
    if n < 2:
        raise _Unmeasurable(f"the batch has {n} sample(s): the variances of the fit need at least 2")
    return n, mean, var


def slope_observation(per_sample, direction: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, unbiased variance) of the per-sample directional derivatives g_i . direction."""
    _, mean, var = mean_and_var(_group(per_sample), per_sample.dots(direction))
    return mean, var


def _group(per_sample):
    inputs = getattr(per_sample, "inputs", None)  # the view's step inputs (a test's stand-in may have none)
    return inputs.watched.dist if inputs is not None else None


def check_supported(per_sample) -> None:
    """Raise when some parameter has no per-sample information. Called in ``before_step``: asking
    builds every layer's per-sample data while the parameters are still theta_t (a layer whose
    per-sample gradients depend on its own weights, e.g. attention, must not see theta_{t+1})."""
    missing: Dict[str, str] = per_sample.unsupported()
    if missing:
        by_reason: Dict[str, List[str]] = {}
        for name, why in missing.items():
            by_reason.setdefault(why, []).append(name)
        parts = []
        for why, names in by_reason.items():
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            parts.append(f"{', '.join(names[:4])}{more}: {why}")
        raise _Unmeasurable("per-sample gradients are not available for " + "; ".join(parts))


class Alpha(Quantity):
    name = "alpha"
    needs = frozenset({"loss", "update", "layer_io"})
    description = ("step-size quality from a noise-aware parabola along the update (-1 no progress, "
                   "0 lands on the minimum, 1 overshoots to the starting height); any optimizer")

    def __init__(self, schedule=None):
        super().__init__(schedule)
        self._start: Optional[_Start] = None  # the step whose end observation is pending
        self._direction: Optional[List[torch.Tensor]] = None  # d/||d|| of self._start, O(P)
        self._undelivered: Optional[Tuple[int, str]] = None  # a NaN reason waiting for a ctx

    # -- scheduling ---------------------------------------------------------------------------
    def is_active(self, step: int) -> bool:
        if self.schedule(step) or (step >= 1 and self.schedule(step - 1)):
            return True
        # a pending result (e.g. after a skipped step) is written on the next step
        return self._undelivered is not None or self._start is not None

    def per_sample_direction(self, step) -> Optional[List[torch.Tensor]]:
        """The direction the end point of a pending fit projects onto on ``step`` (persample/plan.py: the
        projections g_i . d/||d|| come from the step's shared per-layer pass)."""
        start = self._start
        if start is None or start.t is None or self._direction is None or (step is not None and start.step != step - 1):
            return None
        return self._direction

    def per_sample_keep(self, step) -> bool:
        """Whether a fit starts on ``step``: its projections after the optimizer step can then use the
        per-sample blocks the step's shared pass builds anyway (persample/plan.py keeps them)."""
        return step is not None and bool(self.schedule(step))

    # -- callbacks ----------------------------------------------------------------------------
    def before_step(self, ctx) -> None:
        if self._undelivered is not None:
            step, reason = self._undelivered
            self._undelivered = None
            ctx.emit_for_step(step, "alpha", reason=reason)
        stats: dict = {}  # the step's per-sample loss statistics, shared by the end and the start of fits
        if self._start is not None:
            self._finish(ctx, stats)
        if not self.schedule(ctx.step):
            return
        if ctx.moved_since_grad:  # f(0) is not at the update's start point
            ctx.emit_nan("alpha", _moved.since_grad_reason(ctx.moved_since_grad))
        else:
            try:
                check_supported(ctx.per_sample)
                n, f, var_f = loss_observation(ctx.per_sample, stats)
                self._start = _Start(step=ctx.step, n=n, f=f, var_f=var_f,
                                     others=_moved.fingerprint(_moved.others(ctx.watched)[1]))
            except _Unmeasurable as err:
                ctx.emit_nan("alpha", str(err))
            except Exception as err:  # never let a hook crash the loop; say what went wrong
                ctx.emit_nan("alpha", f"{type(err).__name__} while observing the start of the step: {err}")

    def after_step(self, ctx) -> None:
        start = self._start
        if start is None or start.step != ctx.step:
            return
        try:
            with torch.no_grad():
                update = ctx.update
                norms = torch._foreach_norm(update) if update else []
                t = torch.linalg.vector_norm(torch.stack([n.double() for n in norms])) if norms else None
                if t is None:
                    raise _Unmeasurable("no parameters are observed")
                inv_t = torch.where(t > 0, 1.0 / t, torch.zeros_like(t)).to(update[0].dtype)
                if self._direction is None or len(self._direction) != len(update) or any(b.shape != u.shape or b.dtype != u.dtype or b.device != u.device
                                                  for b, u in zip(self._direction, update)):
                    self._direction = [torch.empty_like(u) for u in update]
                torch._foreach_copy_(self._direction, update)
                torch._foreach_mul_(self._direction, inv_t)
                start.t = t
                start.df, start.var_df = slope_observation(ctx.per_sample, self._direction)
                start.frozen = _frozen_parts(ctx, norms)
                start.after = _moved.fingerprint(ctx.params)
        except _Unmeasurable as err:
            self._start = None
            ctx.emit_nan("alpha", str(err))
        except Exception as err:
            self._start = None
            ctx.emit_nan("alpha", f"{type(err).__name__} while observing the update: {err}")

    def on_skipped(self, step: int, reason: str) -> None:
        start = self._start
        if start is not None and start.step == step - 1:
            self._start = None
            self._undelivered = (start.step, f"the next step ({step}) was skipped, so the end point of the fit "
                                             f"was never observed: {reason}")

    def finish(self, ctx) -> None:
        """At close: a NaN reason still waiting for a step to be written on (the run ended right after a
        skipped step) is written. The last step's own alpha stays absent: the run ended, nothing failed,
        and its fit needs a next step that never came (as in Cockpit)."""
        if self._undelivered is not None:
            step, reason = self._undelivered
            self._undelivered = None
            ctx.emit_for_step(step, "alpha", reason=reason)
        self._start = None

    def close(self) -> None:
        self._start = None
        self._direction = None
        self._undelivered = None

    # -- the end point and the fit ----------------------------------------------------------------
    def _finish(self, ctx, stats: dict) -> None:
        # self._start stays set while the end point is observed: the step's plan of per-sample work
        # (per_sample_direction) may be made then, by the first per-sample request
        try:
            self._finish_start(ctx, self._start, stats)
        finally:
            self._start = None

    def _finish_start(self, ctx, start: _Start, stats: dict) -> None:
        if start.step != ctx.step - 1:
            ctx.emit_for_step(start.step, "alpha", reason=f"the next step ({start.step + 1}) was not observed")
            return
        if start.t is None:  # the step's own after_step never completed
            ctx.emit_for_step(start.step, "alpha", reason="the update of the step was not observed")
            return
        if ctx.moved_since_grad:  # the end point's gradient and loss were taken elsewhere than at the step
            ctx.emit_for_step(start.step, "alpha", reason=_moved.since_grad_reason(ctx.moved_since_grad) +
                              f" (the end point, step {ctx.step})")
            return
        try:
            check_supported(ctx.per_sample)
            with torch.no_grad():  # the slope along the last update, reduced with the losses
                dots = ctx.per_sample.dots(self._direction)
            n1, f1, var_f1 = loss_observation(ctx.per_sample, stats, along=dots)
            df1, var_df1 = stats["along"]
        except _Unmeasurable as err:
            ctx.emit_for_step(start.step, "alpha", reason=f"end point (step {ctx.step}): {err}")
            return
        except Exception as err:
            ctx.emit_for_step(start.step, "alpha", reason=f"{type(err).__name__} while observing the end point "
                                                          f"(step {ctx.step}): {err}")
            return
        # one device-to-host transfer for all nine scalars and the check of the end point's parameters
        device = start.t.device
        moved = _moved.changed(start.after, ctx.params)
        other_names, other_params = _moved.others(ctx.watched)
        moved_others = _moved.changed(start.others, other_params)
        end_frozen = _frozen_parts(ctx, None, self._direction)
        frozen = [f for f in (start.frozen, end_frozen) if f is not None]
        (t, f0, f1, df0, df1, var_f0, var_f1, var_df0, var_df1, *flags) = torch.cat([torch.stack([
            x.detach().double().reshape(()).to(device) for x in
            (start.t, start.f, f1, start.df, df1, start.var_f, var_f1, start.var_df, var_df1)]),
            moved.double().to(device), moved_others.double().to(device)] + [f[1].to(device) for f in frozen]).tolist()
        moved, moved_others, flags = flags[:len(moved)], flags[len(moved):len(moved) + len(moved_others)], \
            flags[len(moved) + len(moved_others):]
        unobserved = _unobserved_slope(frozen, flags)
        if unobserved:
            ctx.emit_for_step(start.step, "alpha", reason=(
                f"the update moves {', '.join(unobserved[:4])}{' and more' if len(unobserved) > 4 else ''}, which "
                f"had no gradient on step {start.step} or {ctx.step} (frozen with requires_grad_(False), or not "
                "reached by backward) but still moved (momentum, weight decay on a zero .grad): the slope along "
                "the update misses their part"))
            return
        if any(moved):
            ctx.emit_for_step(start.step, "alpha", reason=_moved.reason(
                [n for n, m in zip(ctx.names, moved) if m]) + f" (the end point, step {ctx.step}, is off the update)")
            return
        if any(moved_others):
            names = [n for n, m in zip(other_names, moved_others) if m]
            ctx.emit_for_step(start.step, "alpha", reason=_moved.OTHERS.format(names=_moved.shown(names)))
            return
        fit = fit_alpha(t, f0, f1, df0, df1, var_f0, var_f1, var_df0, var_df1)
        data = {"t": t, "f0": f0, "f1": f1, "df0": df0, "df1": df1, "var_f0": var_f0, "var_f1": var_f1,
                "var_df0": var_df0, "var_df1": var_df1, "w": list(fit.w) if fit.w is not None else None,
                "case": fit.case, "n0": start.n, "n1": n1}
        if math.isnan(fit.alpha):
            ctx.emit_for_step(start.step, "alpha", reason=fit.reason, data=data)
        else:
            if fit.reason:
                data["note"] = fit.reason
            ctx.emit_for_step(start.step, "alpha", fit.alpha, data=data)
            if fit.case == "fit":  # the fit's error from the observations' noise (-1 by definition has none)
                se = alpha_stderr(t, fit.w, (var_f0, var_f1), (var_df0, var_df1), (start.n, n1))
                if math.isfinite(se):
                    ctx.emit_for_step(start.step, "alpha/stderr", se)
                else:
                    ctx.emit_for_step(start.step, "alpha/stderr", reason="batch size unknown or below 2")
