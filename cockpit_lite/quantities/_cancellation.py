"""Whether float32 resolves a variance computed as the difference of two sums (norm/inner/ortho tests, CABS).

The gradient tests and CABS estimate a variance as ``big - other`` (norm test: sum_i ||g_i||^2 - B ||g||^2;
inner test: sum_i (g_i . g)^2 - B ||g||^4; orthogonality test: sum_i ||g_i||^2 - sum_i (g_i . g)^2 / ||g||^2;
CABS: sum_j (sum_i g_ij^2 - B g_j^2)). Where the samples' gradients agree (little noise: near-identical
inputs, a fitted model whose samples pull the same way), both terms are nearly equal float32 sums and their
difference keeps about eps * big / |big - other| of relative error. Measured on a tanh MLP whose 6 inputs
differ by 1e-2 (1e-3): norm_test 3e-4 (1.1e-2) and inner_test 2.4e-3 (1.0: logged 0) relative off the float64
brute force. ``_resolution.py`` covers the other failure (the mean gradient small against the samples').

A value whose estimate ``eps * big / |big - other|`` (halved for a square root) exceeds ``MAX_REL`` is NaN with
the reason.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

from ._resolution import _eps

MAX_REL = 1e-4

REASON = ("the gradient variance{where} is the difference of nearly equal float32 sums (the samples' gradients "
          "agree: the variance is {ratio:.2g} of the sums), resolved to about {err:.1g} relative, too coarse "
          "(at most {max:g})")

Resolved = Tuple[Dict[int, str], Optional[str]]


def reasons(ctx, big: torch.Tensor, diff: torch.Tensor, big_total: torch.Tensor, diff_total: torch.Tensor,
            power: float = 0.5) -> Resolved:
    """({parameter index: reason}, reason for the total or None); ``big`` and ``diff`` ([params], float64):
    the larger term and the difference, per parameter; ``power``: the value goes as diff ** power."""
    eps = _eps(ctx)
    if eps is None:
        return {}, None
    out: Dict[int, str] = {}
    for j, (b, d) in enumerate(zip(big.tolist(), diff.tolist())):
        why = _judge(eps, b, d, power, f" of {ctx.names[j]!r}")
        if why is not None:
            out[j] = why
    return out, _judge(eps, float(big_total), float(diff_total), power, "")


def total_reason(ctx, big, diff, power: float = 0.5) -> Optional[str]:
    """The reason for one value (no parts), or None."""
    eps = _eps(ctx)
    return None if eps is None else _judge(eps, float(big), float(diff), power, "")


def _judge(eps: float, big: float, diff: float, power: float, where: str) -> Optional[str]:
    if not (math.isfinite(big) and math.isfinite(diff)) or big <= 0.0:
        return None  # nothing summed (an all-zero parameter) or non-finite: other reasons say so
    err = power * eps * big / abs(diff) if diff != 0.0 else math.inf
    if err <= MAX_REL:
        return None
    return REASON.format(where=where, ratio=abs(diff) / big, err=err, max=MAX_REL)


def merged(a: Resolved, b: Resolved) -> Resolved:
    """Both judgements: every parameter either names, the first total reason."""
    out = dict(b[0])
    out.update(a[0])
    return out, a[1] or b[1]
