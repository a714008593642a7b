"""Shared pieces of the gradient-noise quantities (norm/inner/ortho tests, GSNR, early stopping, CABS).

Everything is computed once per step (``ctx.once``) so that several active quantities reuse it: the mean gradient g, and sums over the samples: of ||g_i||^2 and (g_i . g)^2 per parameter,
of sum_j g_ij^2 elementwise. The quantities are functions of these sums only, so that in a
data-parallel run (``cockpit_lite.distributed``) adding up the processes' sums gives the statistics of
the global batch. Final reductions run in float64.

The per-layer work is torch; what follows it is arithmetic on a few numbers per parameter, done in numpy on
float64 host copies (``host``: one transfer from an accelerator): a small torch op costs 2-3 us of dispatch, a
numpy one 0.3-0.8 us, and the tests, GSNR and their resolution checks take about a hundred of them a step.
The quantities that use these numbers wrap ``before_step`` in ``quietly`` (a zero gradient gives inf/NaN,
which ``emit_total_and_parts`` turns into NaN with the reason).
"""

from __future__ import annotations

import functools
import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..distributed import sum_numbers, sum_tensors
from ..persample.dense_grads import grad_norms
from . import _resolution, _snr_resolution


FROZEN = ("the parameter has no gradient on this step (frozen with requires_grad=False, or left out of "
          "backward(inputs=...)); the totals leave it out")


def host(tensors: List[torch.Tensor]) -> List[np.ndarray]:
    """float64 numpy copies of small tensors (one transfer for all of them from an accelerator)."""
    if not tensors:
        return []
    if all(t.device.type == "cpu" for t in tensors):
        return [t.detach().to(torch.float64).numpy() for t in tensors]
    return _packed(tensors)


def _packed(tensors: List[torch.Tensor]) -> List[np.ndarray]:
    """``host`` through one float64 buffer: one device-to-host copy (and sync) for all the tensors."""
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).cpu().numpy()
    out, k = [], 0
    for t in tensors:
        out.append(flat[k:k + t.numel()].reshape(tuple(t.shape)))
        k += t.numel()
    return out


def quietly(before_step):
    """``before_step`` with numpy's warnings for division by zero and invalid values off: a zero or
    non-finite gradient's inf/NaN are reported by ``emit_total_and_parts`` with the reason."""
    @functools.wraps(before_step)
    def wrapped(*args, **kwargs):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return before_step(*args, **kwargs)
    return wrapped


def mean_grad(ctx) -> List[torch.Tensor]:
    """g, the mean gradient of the (global) batch, per parameter."""
    return ctx.per_sample.mean_grad()


def sums(ctx, *need: str) -> Dict[str, np.ndarray]:
    """Sums over the samples of the (global) batch, float64 numpy, for the statistics ``need`` and every
    one the step's quantities planned (``per_sample_stats``), so that one reduction over the processes
    of a data-parallel run serves them all:

    ``"sq"`` gives ``sq``: [params] sum_i ||g_i||^2 restricted to each parameter;
    ``"dots"`` gives ``dots2``: [params] sum_i p_ij^2 and ``dots2_total``: [1] sum_i (sum_j p_ij)^2,
    with p_ij = g_i . g restricted to parameter j.
    """
    have = ctx.once(_sums_so_far)
    view = ctx.per_sample
    todo = ((set(need) | view._planned()) & {"sq", "dots"}) - set(have.get("stats", ()))
    if todo:
        parts: Dict[str, torch.Tensor] = {}
        if "sq" in todo:
            parts["sq"] = torch.stack(view.sq_norms_per_param()).double().sum(1)
            # the rounding floors of per-sample gradients summed over positions (_resolution.rounded_away), in
            # the same reduction over the processes
            parts["floors"] = view.rounding_floors().to(parts["sq"].device)
        if "dots" in todo:
            p = torch.stack(view.dots_mean_per_param()).double()  # [params, n_local]
            parts["dots2"] = (p * p).sum(1)
            parts["dots2_total"] = (p.sum(0) ** 2).sum().reshape(1)
        keys = list(parts)
        have.update(zip(keys, host(sum_tensors(ctx.watched.dist, [parts[k] for k in keys]))))
        have["stats"] = set(have.get("stats", ())) | todo
    return have


def _sums_so_far(ctx) -> Dict[str, torch.Tensor]:
    """The step's store of ``sums``: filled as the quantities ask (one store per step)."""
    return {}


def sq_mean_norm_vector(ctx) -> np.ndarray:
    """[params] float64: ||g||^2 restricted to each parameter."""
    return ctx.once(_sq_mean_norm_vector)


def _sq_mean_norm_vector(ctx) -> np.ndarray:
    (norms,) = host([torch.stack(torch._foreach_norm(mean_grad(ctx)))])  # one kernel for all
    return norms ** 2


def second_moment(ctx) -> List[torch.Tensor]:
    """sum_i g_ij^2 over the (global) batch, shaped like each parameter."""
    return ctx.once(_second_moment)


def _second_moment(ctx) -> List[torch.Tensor]:
    return sum_tensors(ctx.watched.dist, ctx.per_sample.second_moment())


def mean_loss(ctx) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(mean of the per-sample losses l_i over the (global) batch, None) or (None, reason)."""
    view = ctx.per_sample
    losses = view.losses()
    reason = view.losses_reason()
    dist = ctx.watched.dist
    if dist is not None:  # every process takes part, whatever its own losses
        bad, total = sum_numbers(dist, [1 if reason else 0, 0.0 if reason else float(losses.double().sum())])
        if bad:
            return None, reason or "per-sample losses are unavailable on another process"
        return torch.tensor(total / view.n, dtype=torch.float64), None
    if reason:
        return None, reason
    return losses.double().mean(), None


def precheck(ctx, name: str, per_param: bool = True) -> bool:
    """Emit NaN with a reason for ``name`` (and, where ``emit_total_and_parts`` would give them, its
    per-parameter keys: a last batch of one sample left them out of the record) when nothing per-sample can
    be computed; True if it can."""
    view = ctx.per_sample
    if view.n < 2:
        why = f"needs at least 2 samples per step, got {view.n}"
        ctx.emit_nan(name, why)
        if per_param and len(ctx.names) > 1:
            for pname in ctx.names:
                ctx.emit_nan(f"{name}/{pname}", why)
        return False
    return True


def resolution(ctx, sensitivity: float = 1.0) -> Tuple[Dict[int, str], Optional[str]]:
    """Where float32 does not resolve the mean gradient well enough for a gradient test whose relative error
    is about ``sensitivity`` * eps * rho (``_resolution.py``): ({parameter index: reason}, reason for the total
    or None); once per step and sensitivity."""
    return ctx.once(_resolution_reasons, sensitivity)


def _resolution_reasons(ctx, sensitivity: float):
    have = sums(ctx, "sq")
    sq, floors = have["sq"], have["floors"]
    return _resolution.merged(_resolution.reasons(ctx, sq, sq_mean_norm_vector(ctx), ctx.per_sample.n, sensitivity),
                              _resolution.rounded_away(ctx, sq, floors))


def emit_total_and_parts(ctx, name: str, total: Optional[torch.Tensor], parts, per_param: bool = True,
                         resolved: Optional[Tuple[Dict[int, str], Optional[str]]] = None, tiny_ok: bool = False) -> None:
    """Emit ``name`` and ``name/<param>`` (``parts``: a list of 0-d tensors or a 1-d tensor); unavailable
    parameters (and the total, if any is) as NaN with the reason; non-finite results (e.g. a zero
    gradient) as NaN with that reason; ``resolved`` (``resolution(ctx)``): values float32 does not
    resolve, NaN with that reason. ``tiny_ok``: a total of sums over the samples (the norm, inner-product and
    orthogonality tests) is kept where the only unavailable parameters are too small for float32 statistics and
    their share of it is below float32's rounding (``tiny_left_out``)."""
    reasons = ctx.per_sample.unsupported()
    blocking = reasons
    if tiny_ok and reasons and total is not None and math.isfinite(float(total)) and tiny_left_out(ctx):
        blocking = {n: r for n, r in reasons.items() if n not in ctx.per_sample.tiny}
    frozen = ctx.per_sample.frozen
    coarse, coarse_total = resolved or ({}, None)
    if per_param and len(ctx.names) > 1:
        values = (parts.tolist() if isinstance(parts, (torch.Tensor, np.ndarray))
                  else [float(v) if v is not None else math.nan for v in parts])
        for j, (pname, v) in enumerate(zip(ctx.names, values)):
            key = f"{name}/{pname}"
            if pname in reasons:
                ctx.emit_nan(key, reasons[pname])
            elif j in frozen:
                ctx.emit_nan(key, FROZEN)
            elif j in coarse:
                ctx.emit_nan(key, coarse[j])
            else:
                _emit_checked(ctx, key, v)
    if blocking:
        first = next(iter(blocking))
        more = f" (and {len(blocking) - 1} more parameter(s))" if len(blocking) > 1 else ""
        ctx.emit_nan(name, f"per-sample information unavailable for {first}: {blocking[first]}{more}")
    elif coarse_total is not None:
        ctx.emit_nan(name, coarse_total)
    else:
        _emit_checked(ctx, name, total)


#: the gradient norm of the other parameters above which those with ||g|| < underflow.TINY_ABS (1e-15) hold less than
#: 1e-12 of ||g||^2: their float32 statistics (off by percents of their own size) move a total of sums over the samples
#: by far less than its rounding
TINY_TOTAL_FLOOR = 1e-9


def tiny_left_out(ctx) -> bool:
    """Whether every parameter too small for float32 statistics (``PerSampleView.tiny``, found on this process) is a
    negligible part of the step's gradient: one process only (a data-parallel run keeps the totals NaN). CaiT's
    LayerScale (1e-5), BART's and EdgeNeXt's tiny gradients made every total NaN though the rest was exact."""
    view = ctx.per_sample
    if not view.tiny or ctx.watched.dist is not None:
        return False
    norms = grad_norms(view)
    rest = math.fsum(x * x for name, x in zip(view.names, norms) if name not in view.tiny and math.isfinite(x))
    return math.sqrt(rest) >= TINY_TOTAL_FLOOR


def _emit_checked(ctx, key, v):
    if v is None:
        ctx.emit_nan(key, "not computable")
        return
    x = float(v)
    if not math.isfinite(x):
        ctx.emit_nan(key, "not finite: the mini-batch gradient is zero or the per-sample gradients are not finite")
    else:
        ctx.emit(key, x)


def snr_sums(ctx, a: float, b: float, eps: float, exact: bool = False):
    """sum_j g_j^2 / v_j per parameter, with the variance estimate v_j = a m2_j - b g_j^2 + eps
    (m2 = sum_i g_ij^2, g the mean gradient), the element counts, the rounding estimate
    sum_j r_j a m2_j / v_j (r_j = g_j^2 / v_j; times eps: the sums' absolute float32 error,
    ``_snr_resolution.py``) and the largest r_j, per parameter.

    Multi-tensor float32 kernels over all parameters (their arithmetic leaves each sum within a few float32
    eps, relative); ``exact``: float64 arithmetic in chunks (``EXACT_CHUNK``; about 3x the time), for
    early_stopping's 1 - n mean_j(...), which cancels near 0 and then needs it (``arithmetic_too_coarse``)."""
    grads, m2s = mean_grad(ctx), second_moment(ctx)
    stack = (lambda xs: torch.stack(xs) if xs else torch.zeros(0, dtype=torch.float64))
    frozen = ctx.per_sample.frozen  # not trained: not among the means' elements
    counts = np.array([0 if j in frozen else g.numel() for j, g in enumerate(grads)], dtype=np.float64)
    if not exact and grads and all(g.dtype == torch.float32 and m.dtype == torch.float32 for g, m in zip(grads, m2s)):
        v = torch._foreach_mul(m2s, a)
        torch._foreach_addcmul_(v, grads, grads, value=-b)
        torch._foreach_add_(v, eps)
        r = torch._foreach_div(grads, v)
        torch._foreach_mul_(r, grads)
        parts = stack([t.sum() for t in r]).double()  # torch's pairwise float32 sums (a float64 sum is 3x slower)
        # sum_j r_j a m2_j / v_j = sum_j r_j (v_j + b g_j^2 - eps) / v_j <= sum_j r_j + b sum_j r_j^2: one norm
        # (the cancellation's term b r_j^2 counted ``_snr_resolution.ROUNDING`` times)
        errs = parts + _snr_resolution.ROUNDING * b * stack(torch._foreach_norm(r)).double() ** 2
        maxes = getattr(torch, "_foreach_max", None)
        tops = (stack(maxes(r)).double() if maxes is not None and all(t.numel() for t in r)
                else stack([t.max().double() if t.numel() else t.new_zeros((), dtype=torch.float64) for t in r]))
        parts, errs, tops = host([parts, errs, tops])
        return parts, counts, errs, tops
    sums_, errs_, tops_, owner = [], [], [], []
    for j, (g, m2) in enumerate(zip(grads, m2s)):
        size = EXACT_CHUNK if g.device.type == "cpu" else max(g.numel(), 1)
        for gc, mc in zip(g.reshape(-1).split(size), m2.reshape(-1).split(size)):
            if not gc.numel():
                continue
            gd = gc.to(torch.float64, copy=True)  # a copy: g (and m2) are the step's cached ones
            big = mc.double() * a
            v = torch.addcmul(big, gd, gd, value=-b).add_(eps)
            r = gd.mul_(gd).div_(v)  # g_j^2 / v_j, in the copy's memory
            sums_.append(r.sum())
            tops_.append(r.max())
            extra = (_snr_resolution.ROUNDING - 1.0) * b * r.square().sum()  # the cancellation's b r_j^2 again
            errs_.append(r.mul_(big).div_(v).sum() + extra)
            owner.append(j)
    k = len(grads)
    if not owner:
        return np.zeros(k), counts, np.zeros(k), np.zeros(k)
    s, e, t = host([torch.stack(sums_), torch.stack(errs_), torch.stack(tops_)])
    idx = np.asarray(owner)
    tops = np.full(k, -np.inf)
    np.maximum.at(tops, idx, t)
    tops[~np.isin(np.arange(k), idx)] = 0.0  # an empty parameter
    return np.bincount(idx, s, k), counts, np.bincount(idx, e, k), tops


# elements per float64 chunk of snr_sums(exact=True) on the CPU: 128 KB temporaries are reused from malloc's free
# lists, while whole-tensor ones (1.6 MB for a 784x256 weight) were mmapped and page-faulted afresh on every call
# (~2 us a fault on the development VM: 5.3 ms for the MLP, against 1.0 ms chunked; benchmarks/noise_exact.py)
EXACT_CHUNK = 16384
ARITHMETIC_EPS = 4 * 2.0 ** -24  # float32 arithmetic of v, the ratio and the product, relative, per element


def arithmetic_too_coarse(value: float, summed: float, tol: float = 1e-5) -> bool:
    """Whether ``value`` = c - ``summed`` (early_stopping's 1 - n mean_j r_j) cancels so far that float32
    arithmetic on the r_j (a few eps of ``summed``) would move it more than ``tol`` relative."""
    if not (math.isfinite(value) and math.isfinite(summed)):
        return False
    return ARITHMETIC_EPS * abs(summed) > tol * abs(value)


def sqrt0(x: np.ndarray) -> np.ndarray:
    """sqrt of variance estimates; tiny negative values from rounding become 0 (non-finite stay)."""
    return np.where(np.isfinite(x), np.sqrt(np.clip(x, 0.0, None)), x)
