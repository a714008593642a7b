"""The advisor's rules: each reads recorded quantities of a run and returns a Diagnosis or None.

Every rule states the quantities, steps and thresholds it used in ``evidence``; a rule whose
quantities were not recorded says nothing (it never guesses from other data).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .diagnosis import Diagnosis
from .stats import clearly_above, clearly_below, median_interval
from .thresholds import Thresholds


def _recent(run, key: str, th: Thresholds, stop: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    steps, values = run.series(key, stop=stop)
    return steps[-th.window:], values[-th.window:]


def _first_nonfinite_step(run) -> Optional[int]:
    steps = run.flagged("nonfinite_loss") + run.flagged("nonfinite_grad")
    return int(min(steps)) if steps else None


def _last_step(run) -> int:
    """The last tracked step (0 without step records); from ``Run.steps``, not the records, which a
    run read from its cache does not build (the advisor panel is part of every plot)."""
    steps = run.steps()
    return int(steps[-1]) if len(steps) else 0


def _finite(steps, values):
    ok = np.isfinite(values)
    return steps[ok], values[ok]


def _paired(s1, v1, s2, v2):
    """(steps, a, b): the values of two series at the steps they share (they may be logged on different
    schedules, so pairing them by position would compare different steps)."""
    steps, i, j = np.intersect1d(s1, s2, assume_unique=True, return_indices=True)
    return steps, v1[i], v2[j]


def _params(run) -> List[str]:
    return [p["name"] for p in run.header.get("params", [])]


def _ev(quantity, steps, observed, threshold, comparison, values=None) -> Dict:
    """One piece of evidence; with ``values``, the 95% interval of their median ("interval")."""
    steps = list(np.asarray(steps).tolist())
    out = {"quantity": quantity, "steps": [steps[0], steps[-1]] if steps else [], "n": len(steps),
           "observed": float(observed), "threshold": threshold, "comparison": comparison}
    if values is not None:
        out["interval"] = list(median_interval(values))
    return out


def _moving_steps(run, th: Thresholds):
    """Recent steps on which the gradient was not exactly zero: on a zero gradient no step is taken, which
    says nothing about the learning rate (alpha is -1 there by definition, the update 0)."""
    s, g = _recent(run, "grad_norm", th)
    if not len(s):
        return None  # grad_norm not recorded: no way to tell, every step counts
    return set(s[g != 0].tolist())


def _unless(steps, values, key: str, run, leave_out):
    """``(steps, values)`` without the steps whose ``data[key]`` structure ``leave_out`` (a predicate) holds for."""
    out = [int(step) for step, d in run.data(key) if isinstance(d, dict) and leave_out(d)]
    if not out:
        return steps, values
    ok = ~np.isin(steps, out)
    return steps[ok], values[ok]


def _fitted_alpha(run, th: Thresholds, keep=None):
    """Recent finite alpha values that measure the step: not the -1 that alpha is by definition where no step was
    taken or the fitted parabola is not convex (``data.alpha.case``), which says nothing about the step size."""
    s, a = _only(*_recent(run, "alpha", th), keep)
    return _finite(*_unless(s, a, "alpha", run, lambda d: d.get("case") in ("no_step", "not_convex")))


def _only(steps, values, keep):
    if keep is None:
        return steps, values
    mask = np.isin(steps, list(keep))
    return steps[mask], values[mask]


# -- learning rate --------------------------------------------------------------------------------
def lr_too_large(run, th: Thresholds) -> Optional[Diagnosis]:
    evidence = []
    s, a = _fitted_alpha(run, th)
    if len(a) >= th.min_points and clearly_above(a, th.alpha_high):  # the median's 95% interval, not the median
        evidence.append(_ev("alpha", s, np.median(a), th.alpha_high, "median >", a))
    s, loss = _recent(run, "loss", th)
    fs, fl = _finite(s, loss)
    if len(fl) >= th.min_points:
        ref = np.median(fl)
        spikes = int(np.sum(fl > th.loss_spike_factor * max(ref, 1e-12)))
        share = spikes / len(fl)
        if share >= th.loss_spike_share:
            evidence.append(_ev("loss", fs, share, th.loss_spike_share, f"share of steps > {th.loss_spike_factor} x median"))
        all_s, all_l = _finite(*run.series("loss"))
        if len(all_l) >= 2 * th.min_points:
            first = np.median(all_l[: th.min_points])
            if clearly_above(fl, 1.5 * first):
                evidence.append(_ev("loss", fs, np.median(fl) / first, 1.5, "recent median / first median >"))
            worst = int(np.argmax(all_l))
            if first > 0 and all_l[worst] > th.loss_blowup_factor * first:
                evidence.append(_ev("loss", [all_s[worst]], all_l[worst] / first, th.loss_blowup_factor,
                                    "largest / first median >"))
    if run.header.get("optimizer") == "SGD":
        # every logged value counts, converged or not: a Lanczos Ritz value is a Rayleigh quotient, hence a lower
        # bound of the top eigenvalue, so "above the stability edge" holds for the true value too. Not a value on
        # a sub-batch (HessMaxEV(subbatch=k)): the top eigenvalue of k samples' Hessian bounds nothing of the batch's
        s, ev = _finite(*_unless(*_recent(run, "hess_max_ev", th), "hess_max_ev", run,
                                 lambda d: d.get("subbatch") is not None))
        _, lr = run.series("lr")
        if len(ev) and len(lr):
            momentum = float(run.header.get("optimizer_defaults", {}).get("momentum") or 0.0)
            limit = 2.0 * (1.0 + momentum) / float(lr[-1])  # stability edge of (heavy-ball) GD on a quadratic
            if np.median(ev) > limit:
                evidence.append(_ev("hess_max_ev", s, np.median(ev), limit, "median > 2(1+momentum)/lr"))
    if not evidence:
        return None
    return Diagnosis(
        "lr_too_large", "The learning rate is too large", min(1.0, 0.45 + 0.25 * len(evidence)),
        "Lower the learning rate (try 3-10x smaller) or add warm-up; steps overshoot the minimum along "
        "their own direction.", evidence, _last_step(run))


def lr_too_small(run, th: Thresholds) -> Optional[Diagnosis]:
    evidence = []
    moving = _moving_steps(run, th)
    s, a = _fitted_alpha(run, th, moving)
    if len(a) >= th.min_points and clearly_below(a, th.alpha_low):
        evidence.append(_ev("alpha", s, np.median(a), th.alpha_low, "median <", a))
    su, upd = _only(*_recent(run, "update_size", th), moving)
    sp, par = run.series("param_norm")
    if len(upd) >= th.min_points and len(par):
        lookup = dict(zip(sp.tolist(), par.tolist()))
        rel = np.array([u / lookup[int(t)] for t, u in zip(su, upd) if lookup.get(int(t))])
        rel = rel[np.isfinite(rel)]
        if len(rel) >= th.min_points and clearly_below(rel, th.rel_update_small):
            evidence.append(_ev("update_size / param_norm", su, np.median(rel), th.rel_update_small, "median <", rel))
    if not evidence:
        return None
    return Diagnosis(
        "lr_too_small", "The learning rate is too small", min(1.0, 0.5 + 0.25 * len(evidence)),
        "Raise the learning rate (try 3-10x larger): the steps barely change the loss along their direction.",
        evidence, _last_step(run))


#: below this batch size the gradient tests' own estimates are too noisy to size a batch from
SMALL_BATCH = 16


# -- batch size -----------------------------------------------------------------------------------
def _batch_size(run) -> Optional[int]:
    """The median ``samples`` of the last 20 step records that state one."""
    recent = run.steps()[-20:]
    steps, samples = run.field("samples")
    sizes = samples[np.isin(steps, recent) & (samples != 0) & np.isfinite(samples)]
    return int(np.median(sizes)) if len(sizes) else None


def gradient_noise_dominates(run, th: Thresholds) -> Optional[Diagnosis]:
    s, nt = _finite(*_recent(run, "norm_test", th))
    # act only when the median's 95% interval (from the test's own spread) lies above the threshold
    if len(nt) < th.min_points or np.median(nt) <= th.norm_test_high:
        return None
    med = float(np.median(nt))
    lo, hi = median_interval(nt)
    batch = _batch_size(run)
    if lo <= th.norm_test_high:
        if not (batch and batch < SMALL_BATCH):
            return None  # at the noise level of the test itself: no advice
        # a batch this small cannot tell: no batch size to suggest, only a batch large enough to measure
        return Diagnosis(
            "gradient_noise_dominates", f"Gradient noise may dominate: a batch of {batch} is too small for the "
            "norm test to decide", 0.4,
            f"Use a batch of at least {SMALL_BATCH * 2} and check again: the norm test's median {med:.3g} has a "
            f"95% interval {lo:.3g}..{hi:.3g} that includes its threshold {th.norm_test_high:g}.",
            [_ev("norm_test", s, med, th.norm_test_high, "median >", nt)], int(s[-1]))
    # the norm test scales as 1/sqrt(B): a batch B' = B * (test / threshold)^2 brings it to the threshold;
    # the interval of the median gives the range of batches the evidence supports
    factor = (med / th.norm_test_high) ** 2
    f_lo, f_hi = (lo / th.norm_test_high) ** 2, (hi / th.norm_test_high) ** 2
    if batch:
        b_lo, b_hi = int(math.ceil(batch * f_lo)), int(math.ceil(batch * f_hi))
        span = f", {b_lo}-{b_hi} within the test's 95% interval" if b_hi > b_lo else ""
        target = f"about {int(math.ceil(batch * factor))} (from {batch}{span})"
    else:
        target = f"about {factor:.1f}x larger"
    small = (f" With so small a batch the test's own estimate is noisy: try at least {SMALL_BATCH * 2} and check "
             "again." if batch and batch < SMALL_BATCH else "")
    return Diagnosis(
        "gradient_noise_dominates", "Gradient noise dominates the mini-batch gradient",
        min(1.0, 0.5 + 0.1 * med), f"Increase the batch size to {target}, or lower the learning rate "
        f"(the norm test says the gradient's direction is mostly noise).{small}",
        [_ev("norm_test", s, med, th.norm_test_high, "median >", nt)], int(s[-1]))


def batch_larger_than_needed(run, th: Thresholds) -> Optional[Diagnosis]:
    evidence, meds = [], []
    for key in ("norm_test", "inner_test", "ortho_test"):
        s, v = _finite(*_recent(run, key, th))
        if len(v) < th.min_points:
            return None
        meds.append(float(np.median(v)))
        if not clearly_below(v, th.tests_low):
            return None
        evidence.append(_ev(key, s, meds[-1], th.tests_low, "median <", v))
    batch = _batch_size(run)
    factor = max((max(meds) / th.norm_test_high) ** 2, 1e-3)
    target = f"about {max(1, int(batch * factor))} (from {batch})" if batch else "a smaller batch"
    return Diagnosis(
        "batch_larger_than_needed", "The batch is larger than the gradient tests require", 0.5,
        f"A batch of {target} would pass the tests; use the compute for more steps or a larger model.",
        evidence, _last_step(run))


# -- gradients by layer ---------------------------------------------------------------------------
def _layer_medians(run, prefix: str, th: Thresholds, stop: Optional[int] = None) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in _params(run):
        s, v = _recent(run, f"{prefix}/{name}", th, stop)
        if len(v):
            out[name] = (s, v)
    return out


def exploding_gradients(run, th: Thresholds) -> Optional[Diagnosis]:
    # look at the steps before a divergence (after it every value is non-finite)
    stop = _first_nonfinite_step(run)
    grads, params = _layer_medians(run, "grad_norm", th, stop), _layer_medians(run, "param_norm", th, stop)
    evidence = []
    for name, (s, g) in grads.items():
        if name not in params:
            continue
        s, g, p = _paired(s, g, *params[name])
        ratio = g / np.maximum(p, 1e-12)
        ratio = ratio[np.isfinite(ratio)]
        if len(ratio) >= min(th.min_points, 2) and np.median(ratio) > th.grad_param_ratio_high:
            evidence.append(_ev(f"grad_norm/{name} / param_norm/{name}", s, np.median(ratio),
                                th.grad_param_ratio_high, "median >"))
    if not evidence:
        return None
    layers = ", ".join(e["quantity"].split("/")[1].split(" ")[0] for e in evidence[:4])
    return Diagnosis(
        "exploding_gradients", f"Gradients explode in {len(evidence)} parameter tensor(s): {layers}",
        min(1.0, 0.6 + 0.1 * len(evidence)),
        "Clip gradients (torch.nn.utils.clip_grad_norm_), use a smaller initialisation scale "
        "(e.g. Kaiming/Xavier), add normalisation layers, or lower the learning rate.",
        evidence, _last_step(run))


def vanishing_gradients(run, th: Thresholds) -> Optional[Diagnosis]:
    grads = _layer_medians(run, "grad_norm", th)
    st, total = _recent(run, "grad_norm", th)
    evidence = []
    for name, (s, g) in grads.items():
        s, g, tot = _paired(s, g, st, total)
        share = g / np.maximum(tot, 1e-30)
        share = share[np.isfinite(share)]
        if len(share) >= th.min_points and 0 < np.median(share) < th.grad_share_low and np.all(g > 0):
            evidence.append(_ev(f"grad_norm/{name} / grad_norm", s, np.median(share), th.grad_share_low, "median <"))
    if not evidence:
        return None
    return Diagnosis(
        "vanishing_gradients", f"Gradients vanish in {len(evidence)} parameter tensor(s)", 0.6,
        "Use residual connections or normalisation, a non-saturating activation, or a better-scaled init.",
        evidence, _last_step(run))


def dead_layers(run, th: Thresholds) -> Optional[Diagnosis]:
    evidence = []
    for name, (s, g) in _layer_medians(run, "grad_norm", th).items():
        if len(g) >= th.min_points and np.all(g == 0):
            evidence.append(_ev(f"grad_norm/{name}", s, 0.0, 0.0, "all =="))
    if not evidence:
        return None
    names = ", ".join(e["quantity"].split("/", 1)[1] for e in evidence[:6])
    return Diagnosis(
        "dead_layers", f"Parameters receive exactly zero gradient: {names}", 0.9,
        "Check for dead ReLUs (large negative biases, too high a learning rate earlier), detached tensors, "
        "or parameters that are not used in the forward pass.", evidence, _last_step(run))


# -- divergence -------------------------------------------------------------------------------------
def _empty_steps(run) -> set:
    """Steps whose batch had no samples: their mean loss is 0/0 by construction, not a divergence."""
    steps, samples = run.field("samples")
    return set(steps[samples == 0].tolist())


def _recovered_after(run, step: int) -> bool:
    """The last recorded loss (else gradient norm) after ``step`` is finite again."""
    for key in ("loss", "grad_norm"):
        s, v = run.series(key, start=step + 1)
        if len(v):
            return bool(math.isfinite(v[-1]))
    return False


def divergence(run, th: Thresholds) -> Optional[Diagnosis]:
    empty = _empty_steps(run)
    flagged = sorted(set(run.flagged("nonfinite_loss") + run.flagged("nonfinite_grad")) - empty)
    first_step, where = (int(flagged[0]) if flagged else None), []
    if first_step is not None:
        where = [n for n in _params(run) if _nonfinite_at(run, f"grad_norm/{n}", first_step)]
        what = "loss" if first_step in run.flagged("nonfinite_loss") else "gradient"
    skipped = [s for s in run.skipped if "not finite" in s.get("reason", "")]
    if first_step is None and not skipped:
        return empty_batches(run, th) if empty else None
    if skipped and (first_step is None or skipped[0]["step"] < first_step):  # the earliest of both kinds
        first_step, what, where = skipped[0]["step"], "gradient (step skipped)", []
    evidence = [{"quantity": "loss/grad_norm flags", "steps": [first_step], "observed": what,
                 "threshold": "finite", "comparison": "not"}]
    layer = f"; first parameter (in model order) with a non-finite gradient: {where[0]}" if where else ""
    action = ("Lower the learning rate, clip gradients, check the inputs of that step for NaN/inf, and use a "
              "numerically stable loss (e.g. CrossEntropyLoss on logits).")
    if _recovered_after(run, int(first_step)):  # one bad step, not a run that diverged: say so, less sure
        n_bad = len(flagged) + len(skipped)
        return Diagnosis(
            "divergence", f"Non-finite {what} first at step {first_step}{layer} ({n_bad} such step(s); later "
            "steps are finite again)", 0.6, "Check the inputs of that step for NaN/inf; if it recurs, " + action[0].lower()
            + action[1:], evidence, int(first_step))
    return Diagnosis(
        "divergence", f"Training diverged: non-finite {what} first at step {first_step}{layer}", 1.0,
        action, evidence, int(first_step))


def empty_batches(run, th: Thresholds) -> Optional[Diagnosis]:
    """Steps whose batch had no samples (their loss is NaN by construction)."""
    empty = sorted(_empty_steps(run))
    if not empty:
        return None
    return Diagnosis(
        "empty_batches", f"{len(empty)} step(s) had an empty batch (0 samples), first at step {empty[0]}", 0.5,
        "Check the data loader (drop_last=True, filters that can empty a batch); the loss of an empty batch is "
        "undefined (NaN), which is not a divergence.",
        [{"quantity": "samples", "steps": [empty[0], empty[-1]], "n": len(empty), "observed": 0.0,
          "threshold": 0, "comparison": "=="}], int(empty[0]))


def _nonfinite_at(run, key: str, step: int) -> bool:
    """``key`` was logged at ``step`` with a non-finite value (stored as "NaN"/"Infinity")."""
    _, values = run.series(key, start=step, stop=step + 1)
    return bool(len(values)) and not math.isfinite(values[0])


# -- generalisation and cost ----------------------------------------------------------------------
def overfitting_signal(run, th: Thresholds) -> Optional[Diagnosis]:
    s, v = _finite(*_recent(run, "early_stopping", th))
    if len(v) < th.min_points:
        return None
    share = float(np.mean(v > 0))
    if share < th.early_stopping_share:
        return None
    return Diagnosis(
        "overfitting_signal", "The early-stopping criterion says the gradient is mostly noise", 0.5 + 0.4 * share,
        "Check a validation loss: if it rises, stop training or add regularisation (weight decay, data "
        "augmentation). (EB criterion, Mahsereci et al. 2017.)",
        [_ev("early_stopping", s, share, th.early_stopping_share, "share of steps > 0 >=")], int(s[-1]))


def rising_cost(run, th: Thresholds) -> Optional[Diagnosis]:
    """Cost (energy, else wall time) per unit of loss decrease: the last third of the run against the
    third before it, on window medians of the loss. Needs 6 windows of data; fires only when the
    recent loss decrease is below ``stall_rel`` and the earlier one was a real decrease."""
    w = th.window
    key, unit = "energy", "J"
    ls, loss = _finite(*run.series("loss"))
    # the cost and the loss of the same steps (a sparse energy schedule or NaN steps in one series would otherwise
    # divide one stretch's cost by another stretch's loss decrease)
    s, cost, loss_e = _paired(*_finite(*run.series("energy")), ls, loss)
    if len(cost) < 6 * w:
        key, unit = "time", "s"  # energy unavailable: wall time stands in, and the evidence says so
        s, cost, loss_e = _paired(*_finite(*run.series("time")), ls, loss)
    loss = loss_e
    if len(cost) < 6 * w or len(loss) < 6 * w:
        return None
    med = [float(np.median(loss[len(loss) - (k + 1) * w: len(loss) - k * w])) for k in range(5, -1, -1)]
    earlier_drop = med[0] - med[2]  # windows -6 .. -4
    recent_drop = med[3] - med[5]  # windows -3 .. -1
    if earlier_drop <= th.stall_rel * abs(med[0]) or recent_drop > th.stall_rel * abs(med[3]):
        return None  # no earlier progress to compare with, or still making progress
    per_before = float(np.sum(cost[-6 * w:-3 * w])) / earlier_drop
    per_recent = float(np.sum(cost[-3 * w:])) / max(recent_drop, 1e-12)
    if per_recent < th.cost_rise_factor * per_before:
        return None
    recent = "no decrease" if recent_drop <= 0 else f"{per_recent:.3g} {unit} per unit of loss decrease"
    return Diagnosis(
        "rising_cost", f"Cost per unit of loss decrease is rising while the loss stalls ({key} used)", 0.6,
        f"Consider stopping, decaying the learning rate, or changing the setup: recent steps give {recent}, "
        f"against {per_before:.3g} {unit} per unit before.",
        [_ev(f"{key} per loss decrease", s[-3 * w:], min(per_recent, 1e300), th.cost_rise_factor * per_before, ">")],
        int(s[-1]))


RULES: Dict[str, Callable] = {
    "divergence": divergence,
    "lr_too_large": lr_too_large,
    "lr_too_small": lr_too_small,
    "gradient_noise_dominates": gradient_noise_dominates,
    "batch_larger_than_needed": batch_larger_than_needed,
    "exploding_gradients": exploding_gradients,
    "vanishing_gradients": vanishing_gradients,
    "dead_layers": dead_layers,
    "overfitting_signal": overfitting_signal,
    "rising_cost": rising_cost,
}
