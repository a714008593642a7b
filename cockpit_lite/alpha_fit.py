"""The noise-aware quadratic fit behind ``alpha`` (a pure numpy function, no torch).

Along the update direction, the loss is observed twice: at tau = 0 (step t's batch, theta_t) and at
tau = t = ||d|| (step t+1's batch, theta_{t+1}). Each observation gives a value f and a directional
derivative f' = g . d/||d||, each with a variance over the batch's samples. A parabola
f(tau) = w0 + w1 tau + w2 tau^2 is fitted by weighted least squares, weights = inverse variances:

    Phi = [[1, 0, 0], [1, t, t^2], [0, 1, 0], [0, 1, 2t]],   y = [f0, f1, df0, df1]
    w = argmin (y - Phi w)^T diag(1/var) (y - Phi w)

``alpha = 2t / abar - 1`` with ``abar = -w1/w2`` (the step that returns to the starting height):
-1 no progress, 0 the step lands on the fitted minimum, 1 it lands on the opposite slope at the
starting height. As in Cockpit (``cockpit/quantities/alpha.py``): a variance of exactly 0 is
replaced by 1e-10, a step of length 0 gives -1, and a fit that is not convex gives -1. Deviation:
Cockpit's ``w2 == 0`` gives ``2t/(-w1/0) - 1`` = -1 (or NaN when also ``w1 == 0``); here any
``w2 <= 0`` gives -1, with the case named; ``w1 == 0 < w2`` (Cockpit: 2t/0 = inf) gives NaN with
a reason; a batch of one sample (no variance) gives NaN with a reason (Cockpit: NaN without one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

ZERO_VARIANCE_SUBSTITUTE = 1e-10


@dataclass(frozen=True)
class AlphaFit:
    """Result of one fit.

    ``alpha`` is NaN only when the fit could not be made (``reason`` says why). ``case`` is one of
    ``"fit"`` (a convex parabola), ``"no_step"`` (t == 0: alpha = -1 by definition),
    ``"not_convex"`` (w2 <= 0: alpha = -1 by definition), ``"invalid"`` (alpha is NaN).
    """

    alpha: float
    w: Optional[Tuple[float, float, float]]
    case: str
    reason: Optional[str] = None


def observation_matrix(t: float) -> np.ndarray:
    """Phi[4, 3]: rows observe f(0), f(t), f'(0), f'(t) of w0 + w1 tau + w2 tau^2."""
    return np.array([[1.0, 0.0, 0.0], [1.0, t, t * t], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0 * t]])


def _fit_weights(var_fs: Tuple[float, float], var_dfs: Tuple[float, float]) -> Tuple[np.ndarray, np.ndarray]:
    """(the observations' variances [4], the fit's weights 1 / var, a zero variance counted as
    ``ZERO_VARIANCE_SUBSTITUTE``), in the order of ``observation_matrix``'s rows."""
    var = np.array([var_fs[0], var_fs[1], var_dfs[0], var_dfs[1]], dtype=np.float64)
    return var, 1.0 / np.where(var == 0.0, ZERO_VARIANCE_SUBSTITUTE, var)


def fit_parabola(t: float, fs: Tuple[float, float], dfs: Tuple[float, float],
                 var_fs: Tuple[float, float], var_dfs: Tuple[float, float]) -> np.ndarray:
    """Weighted least-squares coefficients w[3] = (w0, w1, w2); needs t > 0 and finite inputs."""
    _, weights = _fit_weights(var_fs, var_dfs)
    phi = observation_matrix(float(t))
    y = np.array([fs[0], fs[1], dfs[0], dfs[1]], dtype=np.float64)
    # the same minimiser as Cockpit's normal equations (Phi^T W Phi) w = Phi^T W y, solved as the
    # least-squares problem sqrt(W) Phi w ~ sqrt(W) y (SVD): better conditioned when a variance is ~0
    root_w = np.sqrt(weights)
    w, _, rank, _ = np.linalg.lstsq(phi * root_w[:, None], y * root_w, rcond=None)
    if rank < 3:
        raise np.linalg.LinAlgError(f"rank {rank} < 3")
    return w


def fit_alpha(t: float, f0: float, f1: float, df0: float, df1: float,
              var_f0: float, var_f1: float, var_df0: float, var_df1: float) -> AlphaFit:
    """alpha of a step of length ``t`` from the two noisy observations (see the module docstring)."""
    inputs = {"t": t, "f0": f0, "f1": f1, "df0": df0, "df1": df1,
              "var_f0": var_f0, "var_f1": var_f1, "var_df0": var_df0, "var_df1": var_df1}
    bad = [k for k, v in inputs.items() if v is None or not math.isfinite(float(v))]
    if bad:
        return AlphaFit(math.nan, None, "invalid", f"non-finite inputs to the fit: {', '.join(bad)}")
    negative = [k for k in ("t", "var_f0", "var_f1", "var_df0", "var_df1") if float(inputs[k]) < 0]
    if negative:
        return AlphaFit(math.nan, None, "invalid", f"negative inputs to the fit: {', '.join(negative)}")
    t = float(t)
    if t == 0.0:
        return AlphaFit(-1.0, None, "no_step", "the update was zero (t = 0): alpha = -1 by definition")
    try:
        w = fit_parabola(t, (f0, f1), (df0, df1), (var_f0, var_f1), (var_df0, var_df1))
    except np.linalg.LinAlgError as err:
        return AlphaFit(math.nan, None, "invalid", f"the least-squares system is singular ({err})")
    w_tuple = (float(w[0]), float(w[1]), float(w[2]))
    if not all(math.isfinite(x) for x in w_tuple):
        return AlphaFit(math.nan, w_tuple, "invalid", "the fit produced non-finite coefficients")
    if w_tuple[2] <= 0.0:
        return AlphaFit(-1.0, w_tuple, "not_convex",
                        "the fitted parabola is not convex (w2 <= 0): alpha = -1 by definition")
    abar = -w_tuple[1] / w_tuple[2]
    if abar == 0.0:  # w1 == 0: the start is the fitted minimum; any step goes uphill
        return AlphaFit(math.nan, w_tuple, "invalid",
                        "the start point is the fitted minimum (w1 = 0): 2t/abar is undefined")
    return AlphaFit(2.0 * t / abar - 1.0, w_tuple, "fit")


def alpha_stderr(t: float, w: Tuple[float, float, float], var_fs: Tuple[float, float],
                 var_dfs: Tuple[float, float], ns: Tuple[int, int]) -> float:
    """Standard error of a fitted ``alpha`` (case "fit") from the noise of its four observations.

    Each observation is a mean over its batch's n samples, so its variance is var / n (``ns`` = (n0, n1): the
    batches at tau = 0 and tau = t). The coefficients w = A y with A = (Phi^T W Phi)^-1 Phi^T W (W the fit's
    weights, 1/var) have the covariance A Sigma A^T, Sigma = diag(var / n) (the sandwich form: W is not
    Sigma^-1 where n0 != n1). alpha = -2t w2/w1 - 1, so to first order (delta method)
    se^2 = grad^T Cov(w) grad with grad = (0, 2t w2/w1^2, -2t/w1). Treated as independent: the loss and the
    slope of one batch are means over the same samples, whose covariance is not measured; and the first-order
    error is only meaningful while it is small against |w1| (a slope near 0 makes alpha itself unstable).
    NaN where a batch size is unknown or below 2."""
    n0, n1 = ns
    if not (n0 and n1) or min(n0, n1) < 2 or not all(math.isfinite(x) for x in (t, *w, *var_fs, *var_dfs)):
        return math.nan
    var, weights = _fit_weights(var_fs, var_dfs)
    sigma = var / np.array([n0, n1, n0, n1], dtype=np.float64)
    phi = observation_matrix(float(t))
    try:
        A = np.linalg.solve(phi.T @ (phi * weights[:, None]), phi.T * weights[None, :])
    except np.linalg.LinAlgError:
        return math.nan
    cov = (A * sigma[None, :]) @ A.T
    w1, w2 = float(w[1]), float(w[2])
    grad = np.array([0.0, 2.0 * t * w2 / (w1 * w1), -2.0 * t / w1])
    return float(math.sqrt(max(float(grad @ cov @ grad), 0.0)))


__all__ = ["AlphaFit", "alpha_stderr", "fit_alpha", "fit_parabola", "observation_matrix",
           "ZERO_VARIANCE_SUBSTITUTE"]
