"""Whether float32 (or float64) resolves the mean gradient well enough for the gradient tests.

norm/inner/ortho tests divide by ||g||^2 (or its square). g comes from float32 sums over the samples
(``.grad``, and the forward and backward products before it), whose rounding is about
eps * (the samples' own gradients), not eps * ||g||: where the mean gradient is rho times smaller than the
samples' (rho^2 = sum_i ||g_i||^2 / (n ||g||^2): at the end of full-batch training, or a parameter whose
samples' gradients cancel), g carries a relative error of about eps * rho, and so do the tests.

Measured against float64 per-sample loops (linear least squares trained to its optimum, n = 64): relative
error of norm_test 2.6e-3 to 6.9e-3 at rho 1.4e5-1.7e5 (eps * rho 8e-3 to 1e-2), 3.3e-5 at rho 540, below 1e-5 for
rho < 200; the same fit in float64 reaches rho ~1e14 and an error of 2e-3. The same rule holds with float64's eps.
A test whose eps * rho exceeds ``MAX_REL`` is NaN with the reason; below, its value is within about
sensitivity * eps * rho of the float64 one. The sensitivity is 1 for the norm and orthogonality tests and 2 for
the inner-product test (its p_i = g_i . g carry g's error once more: measured 2.2 eps * rho at rho 540 on an AMD
EPYC, 1.1 eps * rho on Intel, the summation order of the BLAS deciding); each test passes its own.

The inner-product and orthogonality tests have a second limit: each is the square root of a difference of
two sums over the samples (sum_i p_i^2 - n ||g||^4, and sum_i ||g_i||^2 - sum_i p_i^2 / ||g||^2), each carrying
float32's relative rounding; where the difference is cond times smaller than the first sum, the value is off
by about eps * cond / 2 (measured on Hugging Face BERT heads against float64: 7.3e-4 at eps * cond 1.3e-3,
2.7e-3 at 4.5e-3, 6.7e-6 at 1.4e-5; the orthogonality test of a one-element bias, exactly 0, came out 7e-5).
``cancellation`` makes those values NaN where eps * cond / 2 exceeds ``CANCEL_MAX_REL`` = 1e-4 (float32: an ortho
test below about 1/40 of the norm test). The inner-product test's terms p_i^2 carry more rounding (g_i's and g's,
squared): its estimate is 2 eps * cond (measured up to 1.9 eps * cond on small MLPs / a GPT block at B = 2-8,
where eps * cond / 2 let values 1.4e-4 off through), NaN for an inner test below about 0.004 at n = 128.

Not seen by these rules: per-sample gradients that are themselves below float32's resolution (a regression
fitted to residuals ~1e-6 of targets ~1, every sample's gradient then rounding noise); docs/known-limits.md.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np
import torch

MAX_REL = 1e-3  # largest eps * rho (the tests' expected float32 error) logged as a value
HALF_MAX_REL = 2e-2  # 16-bit gradients: the 2e-2 the project holds their values to
# 16-bit gradients (a model .to(torch.bfloat16)): the sums are float32 over the run's rounded per-sample data, whose
# rounding enters a difference cond times smaller than its sums about as eps16 * sqrt(cond) (the elements' errors
# partly cancel): measured up to 0.11 eps16 * sqrt(cond) on a bfloat16 MLP whose samples agree (B = 8, cond up to
# 3e7; inner_test logged 100% off at cond 1.5e6, 6% at 1.2e4); judged at twice that
HALF_CANCEL = 0.2
CANCEL_MAX_REL = 1e-4  # largest eps * cond / 2 (a difference's error, halved by the square root) logged as a value

REASON = ("the mean gradient{where} is {rho:.3g} times smaller than the samples' gradients (rms): {dtype} sums "
          "resolve it to about {err:.1g} relative, too coarse for this test (at most {max:g}); the gradient is "
          "almost pure noise here")


def _eps(ctx) -> Optional[float]:
    """The unit roundoff of the gradients' sums: float64's where every gradient is float64, float32's where
    the coarsest is float32; None for half precision (not judged). Once per step."""
    once = getattr(ctx, "once", None)
    return once(_eps_of_step) if once is not None else _eps_of(ctx.params)


def _eps_of_step(ctx) -> Optional[float]:
    return _eps_of(ctx.params)


def _half_eps(ctx) -> Optional[float]:
    """The eps of the coarsest 16-bit gradient dtype of the step, or None (no 16-bit gradients)."""
    dtypes = _grad_dtypes(ctx.params)
    half = [d for d in (torch.bfloat16, torch.float16) if d in dtypes]
    return float(torch.finfo(half[0]).eps) if half else None


def _judged_eps(ctx) -> Tuple[Optional[float], bool]:
    """(eps, half): the step's float32 / float64 eps (``_eps``), else its 16-bit gradients' (half True); (None,
    False) where it has neither."""
    eps = _eps(ctx)
    if eps is not None:
        return eps, False
    eps = _half_eps(ctx)
    return eps, eps is not None


def _grad_dtypes(params) -> set:
    return {p.grad.dtype for p in params if getattr(p, "grad", None) is not None}


def _eps_of(params) -> Optional[float]:
    dtypes = _grad_dtypes(params)
    if not dtypes or not dtypes <= {torch.float32, torch.float64}:
        return None
    return float(torch.finfo(torch.float32 if torch.float32 in dtypes else torch.float64).eps)


def reasons(ctx, sq: np.ndarray, gg: np.ndarray, n: int,
            sensitivity: float = 1.0) -> Tuple[Dict[int, str], Optional[str]]:
    """({parameter index: reason}, reason for the total or None) from sum_i ||g_i||^2 (``sq``) and ||g||^2
    (``gg``) per parameter, float64; a test's relative error is about ``sensitivity`` * eps * rho. Half-precision
    gradients are not judged (their values are approximate by design, docs/known-limits.md)."""
    eps = _eps(ctx)
    if eps is None:
        return {}, None
    out: Dict[int, str] = {}
    for j, (s, g) in enumerate(zip(sq.tolist(), gg.tolist())):
        why = _judge(eps, s, g, n, f" of {ctx.names[j]!r}", sensitivity)
        if why is not None:
            out[j] = why
    return out, _judge(eps, float(sq.sum()), float(gg.sum()), n, "", sensitivity)


CANCELLED = ("{name}{where} is {form} a difference {cond:.3g} times smaller than the sums it is taken "
             "from ({what}): {dtype} rounding leaves it about {err:.1g} relative, too coarse (at most {max:g})")
FORMS = {0.5: "the square root of", 1.0: "proportional to"}


def cancellation(ctx, name: str, whole: np.ndarray, part: np.ndarray, whole_total: float, part_total: float,
                 what: str, rounding: float = 1.0) -> Tuple[Dict[int, str], Optional[str]]:
    """Like ``reasons`` for a test whose square is proportional to ``whole - part`` (float64 [params] sums, and
    the totals): where rounding * eps * whole / (whole - part) / 2 exceeds ``CANCEL_MAX_REL`` the value is too
    coarse. ``rounding``: the relative rounding of ``whole``'s terms in units of eps (the inner-product test's
    p_i^2 carry more than one eps, ``inner_test.CANCEL_ROUNDING``)."""
    eps, half = _judged_eps(ctx)
    if eps is None:
        return {}, None
    out: Dict[int, str] = {}
    for j, (w, p) in enumerate(zip(whole.tolist(), part.tolist())):
        why = _cancelled(eps, name, w, p, what, f" of {ctx.names[j]!r}", rounding=rounding, half=half)
        if why is not None:
            out[j] = why
    return out, _cancelled(eps, name, whole_total, part_total, what, "", rounding=rounding, half=half)


def _cancelled(eps: float, name: str, w: float, p: float, what: str, where: str, power: float = 0.5,
               rounding: float = 1.0, half: bool = False) -> Optional[str]:
    """The reason a value proportional to (w - p) ** ``power`` is too coarse (its relative error about
    power * rounding * eps * w / (w - p); ``half``: 16-bit gradients, ``HALF_CANCEL`` * eps * sqrt(cond)), or None."""
    if not (math.isfinite(w) and math.isfinite(p)) or w <= 0.0:
        return None
    cond = w / (w - p) if w > p else math.inf
    err = HALF_CANCEL * eps * math.sqrt(cond) if half else power * rounding * eps * cond
    most = HALF_MAX_REL if half else CANCEL_MAX_REL
    if err <= most:
        return None
    dtype = "16-bit" if half else "float32" if eps > 1e-10 else "float64"
    return CANCELLED.format(name=name, where=where, form=FORMS[power], cond=cond, what=what, dtype=dtype,
                            err=min(err, 1.0), max=most)


ROUNDED = ("the per-sample gradients of {name!r} are sums over positions that cancel to {ratio:.2g} of their terms "
           "(e.g. an attention key bias: softmax is invariant to it, so its gradient is 0 up to rounding): {dtype} "
           "leaves them about {err:.1g} relative, rounding noise (at most {max:g})")


def is_rounding_noise(eps: float, sq: float, floor: float) -> bool:
    """Whether per-sample gradients with sum_i ||g_i||^2 = ``sq``, sums over positions whose terms give ``floor``
    (``DenseSamples.floor_sq``), are mostly rounding: eps * sqrt(floor / sq) > MAX_REL."""
    if not (math.isfinite(sq) and math.isfinite(floor)) or floor <= 0.0:
        return False
    return eps * math.sqrt(floor) > MAX_REL * math.sqrt(max(sq, 0.0))


def rounded_away(ctx, sq: np.ndarray, floors: np.ndarray) -> Tuple[Dict[int, str], Optional[str]]:
    """({parameter index: reason}, None): parameters whose per-sample gradients (sums over positions) are
    mostly the rounding of their sums, judged by sum_i ||g_i||^2 (``sq``) against ``floors`` (sum_i || sum_t
    |terms| ||^2, ``DenseSamples.floor_sq``; NaN where unknown). Their share of the totals is that small too."""
    eps = _eps(ctx)
    if eps is None:
        return {}, None
    out: Dict[int, str] = {}
    for j, (s, f) in enumerate(zip(sq.tolist(), floors.tolist())):
        if not is_rounding_noise(eps, s, f):
            continue
        ratio = math.sqrt(max(s, 0.0) / f)
        out[j] = ROUNDED.format(name=ctx.names[j], ratio=ratio, dtype="float32" if eps > 1e-10 else "float64",
                                err=min(eps / ratio, 1.0) if ratio > 0 else 1.0, max=MAX_REL)
    return out, None


def merged(*judged: Tuple[Dict[int, str], Optional[str]]) -> Tuple[Dict[int, str], Optional[str]]:
    """The reasons of several judges: the first one's where several apply."""
    parts: Dict[int, str] = {}
    total = None
    for reasons_, why in judged:
        for j, r in reasons_.items():
            parts.setdefault(j, r)
        total = total or why
    return parts, total


def _judge(eps: float, s: float, g: float, n: int, where: str, sensitivity: float = 1.0) -> Optional[str]:
    if not (math.isfinite(s) and math.isfinite(g)) or g <= 0.0 or s <= 0.0:
        return None  # zero or non-finite: the tests' own reasons say so
    rho = math.sqrt(s / (n * g))
    err = sensitivity * eps * rho
    if err <= MAX_REL:
        return None
    dtype = "float32" if eps > 1e-10 else "float64"
    return REASON.format(where=where, rho=rho, err=err, max=MAX_REL, dtype=dtype)
