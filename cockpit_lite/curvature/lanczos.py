"""Largest algebraic eigenvalue of a symmetric operator by Lanczos with full re-orthogonalisation.

Cockpit's power iteration returns the eigenvalue of largest magnitude, which on a non-convex loss
can be a negative one; Lanczos gives the top of the spectrum (the largest algebraic eigenvalue)
directly. Warm start: pass the previous step's eigenvector as ``v0``; when the Hessian changed
little, the residual of the first Ritz pair is already below the tolerance and one product suffices.

Stopping rule: the Ritz residual r = ||A y - theta y|| = beta_k |s_k| of the top Ritz pair bounds the
distance from theta to the spectrum (|theta - lambda| <= r for some eigenvalue lambda: Bauer-Fike for a
symmetric A), and ``converged`` means exactly that this bound holds at the requested accuracy:
r <= tol * max(|theta|, 1e-3 * scale) (scale = max|theta_i|, the spectral-norm estimate; the floor makes a
top eigenvalue near zero reachable: there the promise is tol * 1e-3 of the spectral norm, absolute).
The Ritz value itself is never used to stop: it can stall for a few iterations far from the top
eigenvalue (an earlier "the Ritz value changed by <= tol * scale" rule logged ``converged`` 0.1-0.9% low).
``error_bound`` = r is reported either way (absolute), but never below ``ROUNDING`` * eps(dtype) * scale: r is
the residual of the tridiagonal problem, which goes to 0 (1e-19) when the Krylov space fills the space while the
products themselves carry rounding (float32 Hessian-vector products of 45 small networks: up to 0.9 eps * ||H||,
a 94k-parameter MLP 0.34 eps, a 26k-parameter CNN 0.18 eps; a top eigenvalue of -2.0e-5 under a spectral norm
of 8 came out 3.9e-3 relative off with a bound of 5e-19).
``residual`` = r / scale as before.
A bound on the distance to *some* eigenvalue does not exclude a larger eigenvalue that the start
vector missed (Krylov methods share this); a random or warm start has a non-zero component on it with
probability one, and full re-orthogonalisation keeps it from being lost in rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


SYMMETRY_TOL = 1e-2  # relative asymmetry taken for a wrong operator (float32 rounding: ~1e-7; smaller ones move
# eigenvalues by less than the default tol)
ROUNDING = 4.0  # error_bound >= ROUNDING * eps(dtype) * scale (measured: <= 0.9 eps, margin > 4)


class NotSymmetric(FloatingPointError):
    """The operator is not symmetric: its products cannot be a Hessian's (the reason is the message)."""


def _check_symmetric(c: torch.Tensor, beta: float, norm: float) -> None:
    """Raise :class:`NotSymmetric` when q_j . (A q_k) for the earlier Lanczos vectors is not (0, ..., 0, beta):
    torch.nn.utils.parametrizations.weight_norm's double backward (CPU, torch 2.14) gives an asymmetric "Hessian",
    0.62 off its transpose, whose top eigenvalue Lanczos then misses by 9% while converging."""
    defect = float(torch.linalg.vector_norm(torch.cat([c[:-2], (c[-2:-1] - beta)])))
    if defect > SYMMETRY_TOL * max(norm, 1e-30):
        raise NotSymmetric(
            f"the Hessian-vector products are not symmetric (defect {defect:.3g} against a norm of {norm:.3g}): "
            "an operation in the model has a wrong second derivative in PyTorch's autograd (e.g. "
            "torch.nn.utils.parametrizations.weight_norm), so no curvature from them can be trusted")


@dataclass
class LanczosResult:
    eigenvalue: float
    eigenvector: torch.Tensor  # flat, unit norm
    hvps: int
    converged: bool
    residual: float  # ||A y - theta y|| relative to max |Ritz value|
    error_bound: float = float("inf")  # ||A y - theta y||: some eigenvalue lies within this of ``eigenvalue``
    scale: float = 0.0  # max |Ritz value|: the spectral-norm estimate


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], n: int, *, v0: Optional[torch.Tensor] = None,
                   tol: float = 1e-3, max_iter: int = 40, generator: Optional[torch.Generator] = None,
                   dtype=torch.float32, device=None) -> LanczosResult:
    """Top (algebraic) eigenpair of the symmetric n x n operator ``matvec`` (flat vectors)."""
    if n < 1:
        raise ValueError("top_eigenvalue needs n >= 1")
    if v0 is None or v0.numel() != n or not bool(torch.isfinite(v0).all()) or float(v0.norm()) == 0.0:
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        v0 = torch.randn(n, generator=g, dtype=dtype)
    q = (v0.to(device=device, dtype=dtype) / v0.norm()).reshape(-1)
    basis, alphas, betas = [q], [], []
    theta, s, residual, bound, beta, scale = 0.0, None, float("inf"), float("inf"), 0.0, 0.0
    max_iter = max(1, min(max_iter, n))
    converged = False
    for k in range(max_iter):
        w = matvec(basis[-1])
        if not bool(torch.isfinite(w).all()):
            raise FloatingPointError("the Hessian-vector product is not finite")
        alpha = float(torch.dot(basis[-1], w))
        alphas.append(alpha)
        Q = torch.stack(basis)
        c = Q @ w  # for a symmetric A: (0, ..., 0, beta_{k-1}, alpha_k)
        if k:  # against the spectral-norm estimate: a product along a tiny eigenvalue has a tiny norm
            _check_symmetric(c, betas[-1], max(float(w.norm()), scale))
        w = w - Q.T @ c
        w = w - Q.T @ (Q @ w)  # full re-orthogonalisation, twice is enough
        beta = float(w.norm())
        T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            T += torch.diag(off, 1) + torch.diag(off, -1)
        evals, evecs = torch.linalg.eigh(T)
        theta, s = float(evals[-1]), evecs[:, -1]
        scale = max(float(evals.abs().max()), 1e-30)
        bound = beta * abs(float(s[-1]))
        residual = bound / scale
        if bound <= tol * max(abs(theta), 1e-3 * scale) or beta <= 1e-12 * scale or k + 1 == n:
            converged = True  # the residual bound holds (or the Krylov space is invariant: exact)
            break
        betas.append(beta)
        basis.append(w / beta)
    Q = torch.stack(basis[: len(alphas)])
    y = (s.to(Q.dtype) @ Q)
    y = y / y.norm()
    floor = ROUNDING * torch.finfo(dtype).eps * scale  # the products' own rounding (module docstring)
    return LanczosResult(theta, y, len(alphas), converged, residual, max(bound, floor), scale)
