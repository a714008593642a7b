"""Brute-force references shared by the tests: per-sample losses and gradients by a loop of
``torch.autograd.grad`` over single samples, dense Hessians on tiny nets live elsewhere.

These are deliberately slow and simple; the fast paths in cockpit_lite are tested against them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def _single(t, i: int, batch_dim: int = 0):
    return t.narrow(batch_dim, i, 1) if isinstance(t, torch.Tensor) else t


def per_sample_losses(model, loss_fn_none: Callable, x, y, batch_dim: int = 0) -> torch.Tensor:
    """l_i = loss_fn_none(model(x_i), y_i) summed over the sample's elements (shape [B]).

    ``loss_fn_none`` must use ``reduction="none"``. Each sample is evaluated alone (batch of one).
    """
    B = x.shape[batch_dim]
    out = []
    with torch.no_grad():
        for i in range(B):
            out.append(loss_fn_none(model(_single(x, i, batch_dim)), _single(y, i)).sum())
    return torch.stack(out)


def per_sample_grads_bruteforce(model, loss_fn_none: Callable, x, y, params: Optional[Sequence[torch.Tensor]] = None,
                                batch_dim: int = 0, weights: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """g_i = grad of l_i (the per-sample loss, summed over the sample's elements) for every parameter.

    Returns one tensor per parameter, shaped ``[B, *p.shape]``. ``weights[i]`` (optional) multiplies l_i
    (e.g. B/N for a mean over N tokens spread over B samples). Parameters that do not influence l_i get 0.
    """
    params = list(model.parameters()) if params is None else list(params)
    B = x.shape[batch_dim]
    grads = [torch.zeros(B, *p.shape, dtype=p.dtype) for p in params]
    for i in range(B):
        li = loss_fn_none(model(_single(x, i, batch_dim)), _single(y, i)).sum()
        if weights is not None:
            li = li * weights[i]
        gs = torch.autograd.grad(li, params, allow_unused=True)
        for k, g in enumerate(gs):
            if g is not None:
                grads[k][i] = g
    return grads


def per_sample_grads_accumulated(model, loss_fn_none, batches, params=None):
    """Per-sample gradients over several micro-batches ``[(x, y), ...]``, concatenated along samples."""
    parts = [per_sample_grads_bruteforce(model, loss_fn_none, x, y, params) for x, y in batches]
    return [torch.cat([p[k] for p in parts]) for k in range(len(parts[0]))]


# -- the gradient-noise statistics, straight from QUANTITIES.md (on dense per-sample gradients) --------
def flat(gs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, P] from a list of [B, *shape]."""
    return torch.cat([g.reshape(g.shape[0], -1) for g in gs], dim=1).double()


def norm_test(G: torch.Tensor) -> float:
    B = G.shape[0]
    g = G.mean(0)
    return float(torch.sqrt(((G ** 2).sum() / (g ** 2).sum() - B) / (B * (B - 1))))


def inner_test(G: torch.Tensor) -> float:
    B = G.shape[0]
    g = G.mean(0)
    gg = (g ** 2).sum()
    p = G @ g
    var = ((p ** 2).sum() - B * gg ** 2) / (B - 1)
    return float(torch.sqrt(var / (B * gg ** 2)))


def ortho_test(G: torch.Tensor) -> float:
    B = G.shape[0]
    g = G.mean(0)
    gg = (g ** 2).sum()
    p = G @ g
    var = ((G ** 2).sum() - (p ** 2).sum() / gg) / (B - 1)
    return float(torch.sqrt(var / (B * gg)))


def mean_gsnr(G: torch.Tensor, eps: float = 1e-5) -> float:
    g = G.mean(0)
    return float((g ** 2 / ((G ** 2).mean(0) - g ** 2 + eps)).mean())


def early_stopping(G: torch.Tensor, eps: float = 1e-5) -> float:
    B = G.shape[0]
    g = G.mean(0)
    s2 = ((G ** 2).sum(0) - B * g ** 2) / (B - 1)
    return float(1 - B * (g ** 2 / (s2 + eps)).mean())


def cabs(G: torch.Tensor, lr: float, loss: float) -> float:
    B = G.shape[0]
    g = G.mean(0)
    return float(lr * ((G ** 2).sum(0) - B * g ** 2).sum() / (B * loss))


def losses_and_grads(model, shares: Callable) -> tuple:
    """(l [B], G [B, P]) in float64 from ``shares(model64)``: the list of per-sample losses l_i, each computed
    from sample i alone (its share of the batch's loss, so that mean_i l_i is the loss), differentiated alone."""
    import copy

    m = copy.deepcopy(model).double()
    params = list(m.parameters())
    losses, rows = [], []
    for share in shares(m):
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(share, params)]))
        losses.append(share.detach())
    return torch.stack(losses), torch.stack(rows)


def alpha(losses0, losses1, G0, G1, d) -> float:
    """alpha of QUANTITIES.md: the weighted quadratic fit of the per-sample losses and their slopes along the
    update d at theta_t (losses0, G0) and theta_{t+1} (losses1, G1), on the same batch, all float64."""
    import numpy as np

    t = float(d.norm())
    obs = [(float(ls.mean()), float(ls.var()), float((G @ (d / t)).mean()), float((G @ (d / t)).var()))
           for ls, G in ((losses0, G0), (losses1, G1))]
    (f0, vf0, df0, vd0), (f1, vf1, df1, vd1) = obs
    Phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=np.float64)
    w = np.sqrt(1.0 / np.array([vf0, vf1, vd0, vd1]))
    w0, w1, w2 = np.linalg.lstsq(Phi * w[:, None], np.array([f0, f1, df0, df1]) * w, rcond=None)[0]
    return -1.0 if w2 <= 0 else 2 * t / (-w1 / w2) - 1


def alpha_of_step(model, states, shares: Callable) -> tuple:
    """(alpha, losses [B], G [B, P]) for a step from ``states[0]`` to ``states[1]`` (``model.state_dict()`` copies
    at theta_t and theta_{t+1}) on the batch ``shares`` evaluates: ``alpha`` above, from float64 brute force at both
    ends (``losses_and_grads``); the losses and gradients are theta_t's."""
    import copy

    ref = copy.deepcopy(model)
    ends = []
    for state in states:
        ref.load_state_dict(state)
        ends.append((*losses_and_grads(ref, shares), torch.cat([p.detach().double().reshape(-1) for p in ref.parameters()])))
    (l0, G0, th0), (l1, G1, th1) = ends
    return alpha(l0, l1, G0, G1, th1 - th0), l0, G0
