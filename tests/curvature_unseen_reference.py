"""Curvature of the per-sample rounds' model forms (tests/unseen_*models.py builders, ``Unseen``) against dense
float64 references, for tests/curvature/test_unseen_curvature_round6.py.

The reference knows nothing of cockpit_lite: the step's loss is sum_k w_k loss_fn(*loss_input(call(model, x_k), y_k))
over its micro-batches (w_k = b_k / B for a mean reduction, 1 for a sum: the project's convention for the loop's
factors, ``loss_combine.py``), each micro-batch's forward run from the RNG state and the buffers its training
forward found (caught by a forward pre-hook on the model: dropout masks, spectral_norm's u, v), differentiated
twice by ``torch.autograd.functional`` in float64; ops whose double backward PyTorch gets wrong or lacks are written
out (``PlainOps``: weight norm by its formula, EmbeddingBag bag by bag), Embedding's scale_grad_by_freq / sparse
flags are dropped (they change the gradient's form, not the loss). The GGN is split at the loss function's input
(or at the input of ``tail(model)``); M_j = (1/B) sum_i g_ij^2 from ``unseen_models.reference``'s per-sample loop
(along the batch dim of a sequence-first case)."""

from __future__ import annotations

import copy
import warnings
from typing import List

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

import cockpit_lite
import unseen_curvature_models as U
from curvature_reference import split_flat
from unseen_models import reference, to_double


class PlainOps(TorchFunctionMode):
    """``torch._weight_norm`` as its definition w = v g / ||v|| (norm over every dim but ``dim``): the fused kernel's
    double backward is wrong in PyTorch (CPU, torch 2.14), so a reference through it would be wrong too; and
    ``F.embedding_bag`` bag by bag (its backward has no derivative)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            dims = [d for d in range(v.dim()) if d != dim % v.dim()] if dim != -1 else list(range(v.dim()))
            return v * g / torch.linalg.vector_norm(v, dim=dims, keepdim=True)
        if func is F.embedding_bag:
            return _bags_one_by_one(*args, **kwargs)
        return func(*args, **kwargs)


def _bags_one_by_one(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                     sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """F.embedding_bag as a loop over the bags (PyTorch cannot differentiate its backward): rows picked by indexing,
    reduced one bag at a time (an empty bag, or one of padding only, gives zeros)."""
    if input.dim() == 2:
        bags = list(input)
        ws = list(per_sample_weights) if per_sample_weights is not None else [None] * len(bags)
    else:
        starts = offsets.tolist()[:-1] if include_last_offset else offsets.tolist()
        ends = starts[1:] + [offsets.tolist()[-1] if include_last_offset else input.numel()]
        bags = [input[a:b] for a, b in zip(starts, ends)]
        ws = [per_sample_weights[a:b] if per_sample_weights is not None else None for a, b in zip(starts, ends)]
    out = []
    for idx, w in zip(bags, ws):
        keep = [k for k in range(idx.numel()) if padding_idx is None or int(idx[k]) != padding_idx]
        rows = weight[idx[keep]] * (w[keep].unsqueeze(1) if w is not None else 1.0)
        if not keep:
            out.append(weight.new_zeros(weight.shape[1]))
        else:
            out.append(rows.sum(0) if mode == "sum" else rows.mean(0) if mode == "mean" else rows.max(0).values)
    return torch.stack(out)


class _Caller(nn.Module):
    """``call(model, x)`` as a module, so that ``functional_call`` can swap the model's parameters and buffers."""

    def __init__(self, call, model):
        super().__init__()
        self.call, self.m = call, model

    def forward(self, x):
        return self.call(self.m, x)


def train(u, logdir, steps: int = 2, lr: float = 0.1, quantities=None):
    """``steps`` SGD steps of case ``u`` watched by cockpit-lite; returns (run, [per step: (theta_t, [per
    micro-batch: (buffers, rng state) its forward found]), the model before training]."""
    model = u.model
    before = copy.deepcopy(model)
    seen: List[tuple] = []
    hook = model.register_forward_pre_hook(
        lambda m, a: seen.append(({n: b.detach().clone() for n, b in m.named_buffers()}, torch.get_rng_state())))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    states = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with cockpit_lite.watch(model, opt, loss_fn=u.loss_fn, logdir=logdir,
                                    quantities=quantities if quantities is not None else U.quantities(True)):
                for _ in range(steps):
                    opt.zero_grad()
                    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
                    seen.clear()
                    for x, y, c in u.micro:
                        (c * u.loss_fn(*u.loss_input(u.call(model, x), y))).backward()
                    states.append((theta, list(seen[:len(u.micro)])))
                    opt.step()
    finally:
        hook.remove()
    return cockpit_lite.load(logdir), states, before


def _weights(u):
    sizes = [u.size(x) for x, _, _ in u.micro]
    if getattr(u.loss_fn, "reduction", "mean") == "sum":
        return [1.0] * len(sizes)
    return [s / sum(sizes) for s in sizes]


def dense(u, model, theta, found, tail=None, with_ggn=True):
    """(H, G) in float64 at ``theta`` (the other parameters held at ``model``'s values); ``found``: the buffers and
    RNG state of each micro-batch's forward; ``tail(m)``: a module whose input is the GGN's split (else the loss
    input). G is None where ``with_ggn`` is False."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v for k, v in theta.items()}, strict=False)
    for e in m.modules():  # the loss's Hessian: these flags change the gradient's form (and its derivative), not the loss
        if isinstance(e, nn.Embedding):
            e.scale_grad_by_freq = e.sparse = False
    caller = _Caller(u.call, m)
    fn = copy.deepcopy(u.loss_fn).double()
    names = list(theta)
    shapes = [tuple(theta[n].shape) for n in names]
    flat = torch.cat([theta[n].reshape(-1) for n in names]).double()
    ws = _weights(u)
    outer = torch.get_rng_state()

    def state(f, bufs):
        s = {"m." + k: v.clone() for k, v in split_flat(f, names, shapes).items()}  # Embedding(max_norm) writes it
        s.update({"m." + k: (b.double() if b.is_floating_point() else b).clone() for k, b in bufs.items()})
        return s

    def loss_of(f, k):
        x, y, _ = u.micro[k]
        bufs, rng = found[k]
        torch.set_rng_state(rng)
        out = functional_call(caller, state(f, bufs), (to_double(x),))
        return fn(*u.loss_input(out, to_double(y)))

    try:
        with U._math_attention(), PlainOps():
            H = torch.autograd.functional.hessian(lambda f: sum(w * loss_of(f, k) for k, w in enumerate(ws)), flat)
            if not with_ggn:
                return H, None
            G = 0
            for k, w in enumerate(ws):
                x, y, _ = u.micro[k]
                bufs, rng = found[k]
                seen = []

                def split_out(f, k=k, bufs=bufs, rng=rng):
                    torch.set_rng_state(rng)
                    seen.clear()
                    hook = tail(m).register_forward_hook(lambda mod, a, o: seen.append(a[0])) if tail else None
                    try:
                        out = functional_call(caller, state(f, bufs), (to_double(x),))
                    finally:
                        if hook:
                            hook.remove()
                    first, *rest = u.loss_input(out, to_double(y))
                    return seen[-1] if tail else first, rest

                z, rest = split_out(flat)
                rest = [r.detach() if isinstance(r, torch.Tensor) else r for r in rest]
                J = torch.autograd.functional.jacobian(lambda f: split_out(f)[0], flat).reshape(z.numel(), -1)
                t = tail(m) if tail else (lambda o: o)
                HL = torch.autograd.functional.hessian(lambda o: w * fn(t(o.view_as(z)), *rest), z.detach().reshape(-1))
                G = G + J.T @ HL @ J
    finally:
        torch.set_rng_state(outer)
    return H, G


def second_moment(u, model, theta):
    """M_j = (1/B) sum_i g_ij^2 with the project's g_i (``unseen_models.reference``; a sum reduction's g_i is the
    gradient of sample i's own loss)."""
    m = copy.deepcopy(model)
    m.load_state_dict(theta, strict=False)
    dim = int(u.notes.get("batch_dim", 0))
    if dim:
        return _second_moment_along(u, m, dim)
    _, G, _ = reference(u, m)
    if getattr(u.loss_fn, "reduction", "mean") == "sum":
        G = [g / u.B for g in G]
    return torch.cat([(g ** 2).mean(0).reshape(-1) for g in G])


def _second_moment_along(u, model, dim):
    """``second_moment`` for a model whose samples lie along ``dim`` of its input and output (sequence-first, one
    micro-batch, a mean loss): g_i = B grad L with the other samples' outputs detached."""
    m = copy.deepcopy(model).double()
    fn = copy.deepcopy(u.loss_fn).double()
    params = [p for p in m.parameters() if p.requires_grad]
    (x, y, _), = u.micro
    B = u.size(x)
    with torch.no_grad():
        full = u.call(m, to_double(x))
    rows = []
    for i in range(B):
        out = torch.cat([full.narrow(dim, 0, i), u.call(m, u.take(to_double(x), i)), full.narrow(dim, i + 1, B - i - 1)],
                        dim)
        g = torch.autograd.grad(B * fn(*u.loss_input(out, y)), params, allow_unused=True)
        rows.append(torch.cat([(a if a is not None else torch.zeros_like(p)).reshape(-1) for a, p in zip(g, params)]))
    return (torch.stack(rows) ** 2).mean(0)


def truths(u, states, before, tic=True, tail=None, ggn=True):
    """Per step: {quantity: dense value}, and the Hessian's eigenvalues (TIC only where ``tic``, the GGN where ``ggn``)."""
    out = []
    for theta, found in states:
        H, G = dense(u, before, theta, found, tail, ggn)
        ev = torch.linalg.eigvalsh(H)
        truth = {"hess_trace": float(torch.trace(H)), "hess_max_ev": float(ev[-1])}
        if G is not None:
            truth["ggn_trace"] = float(torch.trace(G))
        if tic:
            M, c = second_moment(u, before, theta), torch.diagonal(H)
            truth["tic_diag"] = float((M / (c + U.EPS)).sum())
            truth["tic_trace"] = float(M.sum() / (c.sum() + U.EPS))
        out.append((truth, ev))
    return out
