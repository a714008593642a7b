"""g, the mean gradient of a step, for ``PerSampleView.mean_grad``: ``.grad`` times one factor checked
against the per-sample information of two cheap parameters, or the per-sample sums where that check
cannot hold (unequal micro-batch weights, DDP over unequal shards, ``.grad`` holding something else)."""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from ..distributed import sum_numbers, sum_tensors
from .dense_grads import dense_grads, grad_norms
from .plan import sum_parts


def mean_grad(view) -> List[torch.Tensor]:
    """g = (1/n) sum_i g_i per parameter (over the global batch in a data-parallel run).

    Taken from ``.grad`` times one factor c (``.grad`` is proportional to g whatever the reduction,
    accumulation factor, loss scale, gradient clipping or DDP's averaging over equal shards), with
    c measured on two cheap parameters of different modules from their per-sample information and
    checked there; when the micro-batches entered ``.grad`` with different weights per sample (sizes
    3 and 5, the loss divided by 2) or the check fails (e.g. ``.grad`` holds something else, or DDP
    averaged unequal shards), g is built from the per-sample information of every parameter.
    """
    if "mean" in view._cache:
        return view._cache["mean"]
    dist = view.inputs.watched.dist
    grads = dense_grads(view.inputs)  # dense_grads.py
    result = None
    checks = _check_params(view) if equal_weights(view) else []
    if dist is not None:  # every process must take part in the same reductions
        k = -1 if not checks else sum((j + 1) * (len(view.params) + 1) ** i for i, j in enumerate(checks))
        # the global sample count rides along (one reduction fewer when n was not asked for yet)
        count, total, squares, n = sum_numbers(dist, [1 if checks else 0, k, k * k, view.n_local])
        view._cache.setdefault("n", int(n))
        same = count == dist.size and dist.size * squares == total * total  # the same parameters everywhere
        checks = checks if same else []
    if checks:
        parts = [view._per_forward(j, lambda ps: ps.total(), lambda G: G.sum(0), lambda b: None) for j in checks]
        refs = sum_tensors(dist, [sum_parts(pt, view.params[j]).double().reshape(-1) for pt, j in zip(parts, checks)])
        refs = [r / view.n for r in refs]
        grs = [grads[j].detach().double().reshape(-1) for j in checks]
        # c by least squares over the checked parameters, then each one must agree on its own
        sums = torch.stack([torch.stack([gr @ gr, gr @ r, r @ r]) for gr, r in zip(grs, refs)]).tolist()
        gg = sum(x[0] for x in sums)
        if gg > 0:
            c = sum(x[1] for x in sums) / gg
            # ||c gr - r||^2 = c^2 gr.gr - 2c gr.r + r.r per checked parameter, against its ||r||^2
            miss = [(c * c * x[0] - 2 * c * x[1] + x[2], x[2]) for x in sums]
            tol, nan_tol = _tolerance(view)
            floor = [0.0] * len(sums)
            # c = 0: the per-sample sums are 0 where .grad is not; only a .grad that is 0 up to rounding may pass
            if c == 0.0 or not all(d <= tol * tol * r2 + 1e-60 for d, r2 in miss):
                floor = _rounding_floor(view, grads, checks)  # a gradient that is 0 up to rounding agrees with any c
            zero_sums = c == 0.0 and any(x[0] > f for x, f in zip(sums, floor))
            if not zero_sums and all(d <= tol * tol * r2 + f + 1e-60 for (d, r2), f in zip(miss, floor)):
                if abs(c - 1.0) < 1e-6:
                    c = 1.0  # mean reduction without accumulation: .grad is g (no copy)
                view._cache["mean_factor"] = c
                # in 16 bits .grad's elements are rounded to 16 bits (a weight gradient's GEMM output) where the
                # per-sample statistics are float32 sums of products of the same 16-bit factors: mixing the two put
                # a variance g_j^2 - m2_j / n off by that rounding times the GSNR (mean_gsnr of an RNN head's weight
                # under bfloat16 autocast 5.4% off float64, whose per-sample sums give it within 0.2%): g from the
                # per-sample sums there, as ``.grad`` elsewhere is those sums
                if dist is not None or not sixteen_bit(view):
                    result = [view._nan(g.shape) if view.names[j] in view._reasons
                              else _scaled(g.detach(), c) for j, g in enumerate(grads)]
            elif dist is None and (zero_sums or any(d > nan_tol * nan_tol * r2 + f for (d, r2), f in zip(miss, floor))):
                # one process, every sample of the same weight: .grad must be c g. It is not: .grad holds a
                # term the per-sample gradients do not (a penalty on the parameters in the loss), or was changed
                # after backward; the values would describe another gradient than the step's. (Between tol and
                # nan_tol, where rounding in half precision can be the cause: g from the per-sample sums, below.)
                result = _disagrees(view, [view.names[j] for j in checks], grads, miss)
        if dist is not None:  # the same decision everywhere
            ok = sum_numbers(dist, [1 if result is not None else 0])[0] == dist.size
            result = result if ok else None
    if result is None:
        result = [s / view.n for s in sum_tensors(dist, view.sum_grads())]
    view._cache["mean"] = result
    return result


DISAGREES = ("the mean of the per-sample gradients is not proportional to .grad (on {names}, off by {rel:.2g} "
             "relative): the loss back-propagated has a term the loss module does not compute (e.g. an L2 penalty on "
             "the parameters, use the optimizer's weight_decay; an auxiliary or z-loss on the output, pass a loss "
             "module that computes the whole loss), or .grad was changed after the backward pass (clip_grad_value_, "
             "a hook); the per-sample gradients would not describe this step's gradient")


def _disagrees(view, names, grads, miss) -> List[torch.Tensor]:
    """Every parameter NaN with the reason (``DISAGREES``); the mean gradient returned is NaN too. ``miss``:
    (||c .grad - r||^2, ||r||^2) per checked parameter."""
    rel = max(math.sqrt(max(d, 0.0) / r2) if r2 > 0 else 1.0 for d, r2 in miss)
    reason = DISAGREES.format(names=" and ".join(repr(n) for n in names), rel=rel)
    for name in view.names:
        view._reasons.setdefault(name, reason)
    view._cache["mean_reason"] = reason
    return [view._nan(g.shape) for g in grads]


def check(view) -> None:
    """Run the check of ``mean_grad`` now (one process, equal weights): its reasons reach ``unsupported()``
    before any quantity reads them, also for quantities that never ask for g (alpha)."""
    if view.inputs.watched.dist is None and equal_weights(view):
        mean_grad(view)


def equal_weights(view) -> bool:
    """Whether every micro-batch entered ``.grad`` with the same weight per sample (its factor b_k / s_k
    or 1 / s_k). Only then is ``.grad`` proportional to g: micro-batches of 3 and 5 samples with the
    loss divided by 2 give .grad = (mean_3 + mean_5) / 2, not the mean over the 8 samples."""
    if len(view.factors) < 2:
        return True
    f = torch.stack([x.detach().double().reshape(()).cpu() for x in view.factors]).tolist()
    return max(f) - min(f) <= 1e-6 * max(abs(x) for x in f)


def _rounding_floor(view, grads, checks) -> List[float]:
    """Per checked parameter, the squared difference that float32 rounding alone can leave: (1e-5)^2 times its
    size times the largest mean squared gradient element of any parameter. A bias whose gradient is 0 by structure
    (the shared bias of a triplet loss's anchor, positive and negative) holds only rounding, ~1e-8."""
    scale2 = max((n * n / g.numel() for n, g in zip(grad_norms(view), grads) if g is not None and g.numel()),
                 default=0.0)
    return [1e-10 * scale2 * grads[j].numel() for j in checks]


def sixteen_bit(view) -> bool:
    """Whether the step's gradients were computed in 16 bits: half-precision parameters, or a forward under
    torch.autocast (seen in the model calls or the captured layers' output gradients)."""
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in view.params):
        return True
    if any(getattr(c, "autocast", None) is not None for c in getattr(view.inputs, "model_calls", None) or ()):
        return True
    half = (torch.float16, torch.bfloat16)
    for calls in getattr(view, "calls_by_forward", {}).values():  # autocast seen in the captured layer calls
        if any(getattr(c, "output_grad", None) is not None and c.output_grad.dtype in half for c in calls):
            return True
    return False


def _tolerance(view) -> Tuple[float, float]:
    """(tol, nan_tol): relative differences between c .grad and the per-sample mean. Within tol, g is c .grad;
    beyond nan_tol, every parameter is NaN (``DISAGREES``); between them, g comes from the per-sample sums.
    Exact float32 (CPU, or CUDA without TF32; no autocast, no half-precision parameters or captures), where both
    are float32 sums of the same products: (1e-5, 1e-5). Otherwise rounding reaches ~1e-2 (bfloat16):
    (1e-3, 5e-2). A penalty of 1e-4 * ||theta||^2 in the loss moves a bias's gradient by ~6e-4 relative."""
    loose = (1e-3, 5e-2)
    if sixteen_bit(view):
        return loose
    dev = view.params[0].device.type if view.params else "cpu"
    if dev == "cuda":  # TF32 rounds to ~1e-3: matmuls where allowed, convolutions (cuDNN's default) where allowed
        convs = any(isinstance(c.module, torch.nn.modules.conv._ConvNd)
                    for calls in getattr(view, "calls_by_forward", {}).values() for c in calls)
        if torch.backends.cuda.matmul.allow_tf32 or (convs and torch.backends.cudnn.allow_tf32):
            return loose
    return (1e-5, 1e-5) if dev in ("cpu", "cuda") else loose


def _check_params(view) -> List[int]:
    """Parameters on which ``.grad`` is checked against the per-sample sum (cheap to build): the
    smallest, preferring ones of 3 or more elements (a 1-element bias, or the bias of a 2-class softmax
    whose gradient is always (a, -a), agrees with any multiple), and the smallest of another module."""
    cands = []
    for j, p in enumerate(view.params):
        if view.names[j] in view._reasons or not view.feeds[j] or view.params[j].grad is None:
            continue
        if len({pos for pos, _, _ in view.feeds[j]}) != len(view.feeds[j]):
            continue  # shared within a forward: dense path, not cheap
        cands.append((p.numel() < 3, p.numel(), j))
    cands.sort()
    chosen, modules = [], set()
    for _, _, j in cands:
        mods = {id(c.module) for _, c, _ in view.feeds[j]}
        if chosen and mods & modules:
            continue
        if view._param_samples(j) is None:
            continue
        chosen.append(j)
        modules |= mods
        if len(chosen) == 2:
            break
    return chosen


def _scaled(g: torch.Tensor, c: float) -> torch.Tensor:
    if g.dtype in (torch.float16, torch.bfloat16):
        g = g.float()
    return g if c == 1.0 else g * c
