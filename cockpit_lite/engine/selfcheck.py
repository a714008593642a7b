"""Self-check of the per-sample layer rules against autograd, on the first step that uses them.

The layer rules read dim 0 of every module call as the batch. A module called on an input without the
batch dimension, whose output is then broadcast over the batch (``nn.Embedding(T, d)(arange(T))``
added to [B, T, d] token embeddings), breaks that: when T != B the sizes disagree and the rules say
so, but when T == B nothing in the shapes shows it and the rules would return per-position values as
if they were per-sample ones. No shape test can tell; a direct computation can.

So on the first step with per-sample quantities, the first sample's gradient r = grad l_0 is computed
by autograd on a re-evaluation of the step's first micro-batch (same inputs, same dropout masks, same
autocast; ``torch.func.functional_call``, RNG restored afterwards) and compared, per parameter, with
g_0 from the rules through two numbers the rules give cheaply (||g_0||^2 and g_0 . r):

    ||g_0 - r||^2 = ||g_0||^2 - 2 g_0 . r + ||r||^2  <=  TOL^2 max(||g_0||^2, ||r||^2).

A parameter that fails gets NaN with the reason in every per-sample quantity for the rest of the run.
The result is logged once as ``data.persample_check`` ({"status": "passed" | "failed" |
"unavailable", ...}). When the step cannot be replayed (the model's output is not what the loss
received, a forward that is not replayable), each parameter's mean per-sample gradient from the rules is
compared with ``.grad`` instead (``_sum_check``: finds a parameter also used outside its module, not a
module called without the batch dimension); if none disagrees, the check is "unavailable" and the values
stand unverified, as the log says. In a data-parallel run every process checks its own first sample and a
parameter failing anywhere fails everywhere.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch

from ..distributed import sum_tensors
from ..rng import preserved_rng
from ..persample.losses import LossUnavailable, elementwise_loss, group_elements
from .calls import bracket

TOL = 0.1  # relative norm of g_0 - r; a broken rule is off by O(1), autocast rounding by ~1e-2
# without autocast or half-precision parameters (TF32 matmuls and convolutions round to ~1e-3): samples that mix
# through a statistic over the batch computed by hand (h - h.mean(0)) put g_0 off by O(1/sqrt(B)), 0.08 at B=64
TOL_FULL = 1e-2
FAILED = ("the per-sample layer rule disagrees with autograd on this parameter (relative difference "
          "{rel:.2g} on the first sample of step {step}). Is its module called on an input without the "
          "batch dimension (e.g. nn.Embedding(T, d)(torch.arange(T)) broadcast over the batch; call it with "
          "arange(T).expand(B, -1)), is the parameter also used outside its module (e.g. a weight tied "
          "through a plain matmul), or do the samples mix in the forward (a statistic over the batch)?")

SUM_FAILED = ("the per-sample layer rule disagrees with .grad on this parameter (its mean over the samples is "
              "off by {rel:.2g} relative on step {step}; the step could not be replayed for the first-sample "
              "check): is the parameter also used outside its module (e.g. a weight tied through F.linear or a "
              "plain matmul), or was .grad changed after the backward pass (clip_grad_value_, a term added to it)?")


REPLAY_OFF = ("the per-sample layer rule disagrees with autograd on this parameter, and so does the per-sample "
              "replay of loss_fn with .grad (its mean over the samples is off by {rel:.2g} relative on step {step}): "
              "the back-propagated loss is not only loss_fn's (a term added to it outside loss_fn, e.g. a penalty "
              "on the model output or a second loss module), so the per-sample losses l_i are not known")


class _Unavailable(Exception):
    pass


def run(ctx) -> Optional[dict]:
    """Check the rules on this step; store the outcome on ``ctx.watched`` and log it. Returns the
    outcome, or None when this step cannot serve (no per-sample information, a non-finite step):
    the next one tries again."""
    from ..persample.view import PerSampleView

    watched = ctx.watched
    view = ctx.per_sample
    if view._global_reason is not None or not view.batch_sizes:
        _agree(watched.dist, {}, len(view.names), retry=True)  # every process waits for a later step
        return None
    names, reasons = view.names, view.unsupported()
    tol = _tolerance(ctx, view)
    sq = [s[0] if s.numel() else None for s in view.sq_norms_per_param()]  # same order of reductions everywhere
    noise = _rounding_noise(view)
    looked_at = {(names[j], how) for j, how in rule_served(view).items()}
    try:
        refs = _first_sample_gradient(ctx, view)
        dots = [d[0] if d.numel() else None for d in view.dots_per_param(refs)]
        local = {}
        for j, name in enumerate(names):
            if name in reasons or sq[j] is None or j in view.frozen or j in noise:
                # frozen or left out of backward(inputs=...): no gradient on this step, 0 in the rules; or
                # gradients that are rounding noise (an attention key bias): noise cannot be compared with noise,
                # and their values are NaN with that reason (quantities/_resolution.py)
                continue
            rr = float(refs[j].double().pow(2).sum())
            g2, gr = float(sq[j]), float(dots[j])
            if not all(math.isfinite(x) for x in (rr, g2, gr)):
                raise _Unavailable("the step's gradients are not finite")
            d2 = max(g2 - 2.0 * gr + rr, 0.0)
            if d2 > tol * tol * max(g2, rr):
                local[j] = math.sqrt(d2 / max(g2, rr))
        outcome, retry = {}, False
    except (_Unavailable, LossUnavailable) as err:
        local, outcome = {}, {"status": "unavailable", "reason": str(err)}
        retry = "not finite" in str(err)
    except Exception as err:  # never stop training: the values stand, unverified, as logged
        local, outcome, retry = {}, {"status": "unavailable", "reason": f"{type(err).__name__}: {err}"}, False
    template = FAILED
    if outcome and not retry and watched.dist is None:
        local, template = _sum_check(ctx, view, noise), SUM_FAILED  # without a replay: the rules' sums against .grad
    failed = _agree(watched.dist, local, len(names), retry)
    if failed is None:
        return None
    watched.rule_checked |= looked_at
    if failed:
        for j, rel in failed.items():
            reason = template.format(rel=rel, step=ctx.step) if rel is not None else (
                "the per-sample layer rule disagrees with autograd on this parameter in another process")
            watched.rule_failures[names[j]] = reason
        outcome = {"status": "failed", "failed": {names[j]: watched.rule_failures[names[j]] for j in failed},
                   **({"replay_unavailable": outcome["reason"]} if outcome.get("status") == "unavailable" else {})}
        # rebuilt: the failed parameters come from the per-sample replay (replayed.py) or are NaN from here on
        ctx._per_sample = PerSampleView(ctx.inputs())
        still = ctx._per_sample.unsupported()
        off = _replay_off(ctx, ctx._per_sample, [j for j in failed if names[j] not in still], tol) \
            if watched.dist is None else {}
        if off:  # the replay of loss_fn does not explain .grad: NaN, not the replay's values
            for j, rel in off.items():
                watched.replay_rejected[names[j]] = watched.rule_failures[names[j]] = REPLAY_OFF.format(
                    rel=rel, step=ctx.step)
                outcome["failed"][names[j]] = watched.rule_failures[names[j]]
            ctx._per_sample = PerSampleView(ctx.inputs())
            still = ctx._per_sample.unsupported()
        outcome["replayed"] = sorted(names[j] for j in failed if names[j] not in still)
    elif not outcome:
        outcome = {"status": "passed"}
    outcome.update({"step": ctx.step, "parameters": len(names) - len(reasons), "tolerance": tol})
    watched.rule_check = outcome
    ctx.emit_data("persample_check", outcome)
    return outcome


def rule_served(view) -> Dict[int, str]:
    """{parameter index: how its layer rule reads the samples} for the parameters whose per-sample gradients
    come from a layer rule on this step (not unsupported, frozen, or left to the per-sample replay): "rows" (its
    calls' dim 0) or "broadcast" (a call without the batch dimension, read at the addition, broadcast.py)."""
    reasons = view.unsupported()
    return {j: "broadcast" if any(getattr(c, "broadcast", None) for _, c, _ in view.feeds.get(j, ())) else "rows"
            for j, name in enumerate(view.names)
            if name not in reasons and j not in view.frozen and j not in view._replayed}


def unchecked(ctx) -> bool:
    """Whether a layer rule serves a parameter on this step in a way no self-check has looked at: frozen or not
    called on the checked step, or read there at a broadcasting addition because its module's rows differed from
    the batch (``pos(arange(T))`` with T != B) and now, with T == B, read by its rows as if they were samples. One
    process only: in a data-parallel run the check runs once (every process would have to agree on a re-check)."""
    watched = ctx.watched
    if watched.dist is not None or watched.rule_check is None:
        return False
    view = ctx.per_sample
    return any((view.names[j], how) not in watched.rule_checked and view.names[j] not in watched.rule_failures
               for j, how in rule_served(view).items())


def _rounding_noise(view) -> set:
    """Parameters whose per-sample gradients are sums over positions that cancel below float32's rounding."""
    from ..quantities._resolution import _eps_of, is_rounding_noise

    eps = _eps_of(view.params)
    if eps is None:
        return set()
    sq = torch.stack([s.double().sum() for s in view.sq_norms_per_param()]).tolist()
    return {j for j, (s, f) in enumerate(zip(sq, view.rounding_floors().tolist())) if is_rounding_noise(eps, s, f)}


def _tolerance(ctx, view) -> float:
    """TOL under autocast or with half-precision parameters, else TOL_FULL."""
    calls = getattr(ctx, "model_calls", None) or []
    amp = getattr(calls[0], "autocast", None) if calls else None
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in view.params)
    return TOL if amp is not None or half else TOL_FULL


def _sum_check(ctx, view, noise: set) -> Dict[int, float]:
    """{parameter index: relative difference} where the rules' mean (1/n) sum_i g_i is not c .grad (one
    factor c for all: accumulation, loss scale, clipping; the median of the per-parameter ratios). Catches a
    parameter also used outside its module (``F.linear(h, emb.weight)``) without re-evaluating the step; not
    a module called without the batch dimension (its per-position values sum to the right total). Only
    where ``.grad`` is proportional to g (micro-batches of equal weight per sample, one process). ``noise``:
    parameters whose per-sample gradients are rounding noise (``_rounding_noise``), noise on both sides."""
    rows = _grad_rows(ctx, view, noise)
    if rows is None:
        return {}
    # .grad may be clipped or unscaled in another precision: TOL, not the tolerance of the first-sample check
    return _off_factor(rows, [j for j in rows], rows, TOL)


def _replay_off(ctx, view, replayed: List[int], tol: float) -> Dict[int, float]:
    """{parameter index: relative difference} for the replayed parameters whose mean per-sample gradient is
    not c .grad, with c measured on the parameters the layer rules serve (a replay of loss_fn alone cannot
    explain a gradient that has more in it). Empty where it cannot be told (no such parameter, unequal
    micro-batch weights)."""
    rows = _grad_rows(ctx, view) if replayed else None
    if rows is None:
        return {}
    return _off_factor(rows, [j for j in rows if j not in replayed], [j for j in replayed if j in rows], tol)


def _grad_rows(ctx, view, skip=()) -> Optional[Dict[int, tuple]]:
    """{parameter index: (gr.gr, gr.r, r.r)} in float64, gr = ``.grad``, r = the rules' mean per-sample gradient,
    for the parameters that have both (not unsupported, frozen or in ``skip``); None where ``.grad`` is not
    proportional to g (micro-batches of unequal weight per sample)."""
    from ..persample.dense_grads import dense_grads
    from ..persample.mean_grad import equal_weights

    if not equal_weights(view):
        return None
    reasons, grads, sums = view.unsupported(), dense_grads(ctx), view.sum_grads()
    rows = {}
    for j, name in enumerate(view.names):
        if name in reasons or grads[j] is None or j in view.frozen or j in skip:
            continue
        gr, r = grads[j].detach().double().reshape(-1), sums[j].detach().double().reshape(-1) / view.n_local
        rows[j] = (float(gr @ gr), float(gr @ r), float(r @ r))
    return rows


def _off_factor(rows: Dict[int, tuple], among, judged, tol: float) -> Dict[int, float]:
    """{j: ||c gr - r|| / max(||c gr||, ||r||)} over the ``judged`` rows where it exceeds ``tol``, with c the
    median of the ratios gr.r / gr.gr ``among`` the given rows (one factor for all: accumulation, loss scale)."""
    ratios = sorted(rows[j][1] / rows[j][0] for j in among if rows[j][0] > 0)
    if not ratios:
        return {}
    c = ratios[len(ratios) // 2]
    off = {}
    for j in judged:
        gg, gr_r, rr = rows[j]
        d2 = max(c * c * gg - 2 * c * gr_r + rr, 0.0)  # ||c gr - r||^2
        if math.isfinite(d2) and d2 > tol * tol * max(c * c * gg, rr):
            off[j] = math.sqrt(d2 / max(c * c * gg, rr))
    return off


def _agree(dist, local: Dict[int, float], count: int, retry: bool) -> Optional[Dict[int, Optional[float]]]:
    """The parameters that failed in any process ({index: local relative difference or None}), or None
    when some process asks to retry on a later step."""
    if dist is None:
        return None if retry else dict(local)
    flags = torch.zeros(count + 1, dtype=torch.float64)
    for j in local:
        flags[j] = 1.0
    flags[count] = 1.0 if retry else 0.0
    (flags,) = sum_tensors(dist, [flags])
    if flags[count] > 0:
        return None
    return {j: local.get(j) for j in range(count) if flags[j] > 0}


def _first_sample_gradient(ctx, view) -> List[torch.Tensor]:
    """r = grad l_0 per observed parameter, by autograd on the re-evaluated first micro-batch."""
    from ..curvature.batch_loss import CurvatureUnavailable, rebuild

    try:
        bl = rebuild(ctx)
    except CurvatureUnavailable as err:
        raise _Unavailable(str(err)) from None
    call, mb, b = bl.calls[0], view.micro_batches[0], view.batch_sizes[0]
    # frozen parameters (requires_grad=False, e.g. a frozen param group) have no gradient: 0, as in the rules
    params = [p.detach().requires_grad_(t) for p, t in zip(bl.params, bl.trainable)]
    amp = getattr(ctx.model_calls[0], "autocast", None) if ctx.model_calls else None
    with preserved_rng(), torch.enable_grad(), _autocast(amp):
        try:
            out, _ = bl.replay(params, 0)
        except CurvatureUnavailable as err:
            raise _Unavailable(str(err)) from None
        losses = group_elements(ctx.watched.loss_fn, mb, elementwise_loss(ctx.watched.loss_fn, out, call.target,
                                                                          grad=True), b, ctx.reduction,
                                getattr(view, "sample_dim", 0))
    trained = view.losses()[:b].detach().double()
    again = losses.detach().double()
    if not torch.allclose(again, trained, rtol=1e-2, atol=1e-2 * float(trained.abs().max()) + 1e-12):
        raise _Unavailable("re-evaluating the first micro-batch does not reproduce its per-sample losses "
                           "(the loss function receives neither the model output itself nor is called inside "
                           "forward, or the forward is not replayable)")
    trainable = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(losses[0], trainable, allow_unused=True) if trainable else ())
    out = []
    for p in params:
        g = next(grads) if p.requires_grad else None
        out.append(torch.zeros_like(p, dtype=torch.float32) if g is None else g.detach().float())
    return out


def _autocast(amp):
    if amp is None:
        from contextlib import nullcontext

        return nullcontext()
    device, dtype = amp
    return torch.autocast(device, dtype=dtype)


def check_step(cockpit, ctx) -> None:
    """The engine's call on a tracked per-sample step (``Cockpit._check_rules``): ``run`` in a bracket that
    never stops training (a failure anywhere is retried on the next per-sample steps, given up after 3, the
    same count in every process), then one warning naming the parameters whose values are lost."""
    with bracket(cockpit.watched.dist, ctx.step, "persample_check") as outcome:
        try:
            result = run(ctx)
        except Exception as err:
            outcome.fail(err)
    if outcome.anywhere:
        cockpit._rule_check_failures += 1
        if cockpit._rule_check_failures >= 3:  # the same count everywhere: the same decision
            err = outcome.failed or RuntimeError("the check failed in another process")
            result = {"status": "unavailable", "reason": f"{type(err).__name__}: {err}", "step": ctx.step}
            cockpit.watched.rule_check = result  # the values stand unverified, as logged
            ctx.emit_data("persample_check", result)
        else:
            cockpit.watched.rule_check = None
            cockpit.watched.rule_failures.clear()
            ctx.data.pop("persample_check", None)
            return
    lost = {} if result is None or result["status"] != "failed" else {
        n: why for n, why in result.get("failed", {}).items() if n not in result.get("replayed", ())}
    if lost:  # parameters the replay (persample/replayed.py) recovered are not lost
        cockpit._warn_once("rules", "cockpit-lite: per-sample values are unavailable (NaN) for " + "; ".join(
            f"{name}: {why}" for name, why in lost.items()))
