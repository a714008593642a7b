"""Models, losses and set-ups no curvature test had seen (tests/curvature/test_unseen_curvature.py), and the
checker that holds every logged curvature value to the rule: exact and within 1e-4 of the dense float64
reference, or an estimate whose standard error covers the dense truth (4 s.e.), or NaN with a reason;
hess_max_ev within its logged error bound of ``eigvalsh``'s top eigenvalue (and within ``tol`` when converged).

References are independent of cockpit_lite: dense Hessians by ``torch.autograd.functional.hessian`` of the
step's loss (micro-batches weighted as the loss reduction implies), GGNs J^T H_L J from dense Jacobians,
per-sample gradients by a loop of ``autograd.grad`` on single samples, all in float64."""

from __future__ import annotations

import copy
import math
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import cockpit_lite
from cockpit_lite.quantities.ggn_trace import GGNTrace
from cockpit_lite.quantities.hess_max_ev import HessMaxEV
from cockpit_lite.quantities.hess_trace import HessTrace
from cockpit_lite.quantities.tic_diag import TICDiag
from cockpit_lite.quantities.tic_trace import TICTrace
from curvature_reference import split_flat

EPS = 1e-7
PROBES = 40


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def dense(model, loss64, micro, theta, split=None, summed=False):
    """(H, G) of the step's loss over micro-batches ``[(x, y), ...]`` (weights: sample shares for a mean, 1 for
    a sum). ``split(m)`` -> (head, tail): the GGN's split at the head's output, tail folded into the loss; G is
    None for ``split="none"``."""
    m = copy.deepcopy(model).double()
    names = list(theta)
    shapes = [tuple(theta[n].shape) for n in names]
    flat = torch.cat([theta[n].reshape(-1) for n in names]).double()
    sizes = [x.shape[0] for x, _ in micro]
    weights = [1.0] * len(micro) if summed else [s / sum(sizes) for s in sizes]
    head, tail = (m, None) if split in (None, "none") else split(m)
    # the head's parameter names: a submodule's are prefixed, a slice of a Sequential (m[:-1]) keeps m's names
    found = [n for n, mod in m.named_modules() if mod is head and n]
    prefix = found[0] + "." if found else ""

    def out_of(f, x, mod=m, pre=""):
        return functional_call(mod, {k[len(pre):]: v for k, v in split_flat(f, names, shapes).items()
                                     if k.startswith(pre)}, (_d(x),))

    with _math_attention():
        H = torch.autograd.functional.hessian(
            lambda f: sum(loss64(out_of(f, x), _d(y)) * w for (x, y), w in zip(micro, weights)), flat)
        if split == "none":
            return H, None
        G = 0
        for (x, y), w in zip(micro, weights):
            fn = (lambda f, x=x: out_of(f, x, head, prefix))
            out = fn(flat)
            J = torch.autograd.functional.jacobian(fn, flat).reshape(out.numel(), -1)
            t = (lambda o: o) if tail is None else tail
            HL = torch.autograd.functional.hessian(lambda o: loss64(t(o.view_as(out)), _d(y)) * w,
                                                   out.detach().reshape(-1))
            G = G + J.T @ HL @ J
    return H, G


def second_moment(model, loss64, micro, theta):
    """M_j = (1/N) sum_i g_ij^2, g_i the gradient of sample i's loss alone (float64)."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v.double() for k, v in theta.items()}, strict=False)
    ps = list(m.parameters())
    rows = []
    for x, y in micro:
        for i in range(x.shape[0]):
            g = torch.autograd.grad(loss64(m(_d(x[i:i + 1])), _d(y[i:i + 1])), ps, allow_unused=True)
            rows.append(torch.cat([(a if a is not None else torch.zeros_like(p)).reshape(-1) for a, p in zip(g, ps)]))
    return (torch.stack(rows) ** 2).mean(0)


def train(model, loss_fn, steps, logdir, quantities, optimizer=None, loop=None):
    """Watched training: ``steps`` is a list of steps, each a list of micro-batches (x, y); returns (run, thetas)
    with theta_t the parameters the step's curvature is of."""
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.0)
    call = loop or (lambda m, x, y, lf: lf(m(x), y))
    thetas = []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities=quantities):
        for micro in steps:
            opt.zero_grad()
            for x, y in micro:
                call(model, x, y, loss_fn).backward()
            thetas.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.step()
    return cockpit_lite.load(logdir), thetas


def quantities(tic=True, probes=PROBES):
    qs = [HessTrace("every", probes=probes), GGNTrace("every", probes=probes), HessMaxEV("every")]
    return qs + ([TICDiag("every", probes=60), TICTrace("every", probes=60)] if tic else [])


def _at(run, key, step):
    try:
        steps, values = run.series(key)
    except KeyError:
        return None
    steps = list(steps)
    return float(values[steps.index(step)]) if step in steps else None


def _data(run, key, step) -> dict:
    return dict(next((d for s, d in run.data(key) if s == step), {}))


def check(run, thetas, steps, model, loss64, *, split=None, summed=False, tic=True) -> Tuple[List[str], dict]:
    """(violations of the rule, {key: path}) over every step; path is 'exact', 'estimate' or 'nan'."""
    truths = []
    for t, micro in enumerate(steps):
        H, G = dense(model, loss64, micro, thetas[t], split, summed)
        ev = torch.linalg.eigvalsh(H)
        truth = {"hess_trace": float(torch.trace(H)), "hess_max_ev": float(ev[-1])}
        if G is not None:
            truth["ggn_trace"] = float(torch.trace(G))
        if tic:
            M, c = second_moment(model, loss64, micro, thetas[t]), torch.diagonal(H)
            truth["tic_diag"] = float((M / (c + EPS)).sum())
            truth["tic_trace"] = float(M.sum() / (c.sum() + EPS))
        truths.append((truth, ev))
    return judge(run, truths, tic)


def judge(run, truths, tic=True) -> Tuple[List[str], dict]:
    """``check``'s rule on references computed elsewhere: ``truths`` is [(per step: {key: dense value}, the Hessian's
    eigenvalues)]; a key missing from a step's truth has no reference (a finite value there is a violation)."""
    bad, paths = [], {}
    for t, (truth, ev) in enumerate(truths):
        for key in ("hess_trace", "ggn_trace", "hess_max_ev") + (("tic_diag", "tic_trace") if tic else ()):
            got = _at(run, key, t)
            if got is None:
                bad.append(f"step {t} {key}: not logged")
                continue
            if math.isnan(got):
                paths[key] = "nan"
                if not run.reasons(key).get(t):
                    bad.append(f"step {t} {key}: NaN without a reason")
                continue
            if key not in truth:
                bad.append(f"step {t} {key}: {got} logged where the loss gives no reference")
                continue
            ref, info = truth[key], _data(run, key, t)
            if key == "hess_max_ev":
                paths[key] = "lanczos"
                bound = info.get("error_bound", math.inf)
                if not abs(got - ref) <= bound + 1e-6 * abs(ref):
                    bad.append(f"step {t} hess_max_ev {got} not within its bound {bound} of the top {ref} "
                               f"(second {float(ev[-2])})")
                if info.get("converged") and not abs(got - ref) <= info["tol"] * max(abs(ref), 1e-3 * float(ev.abs().max())):
                    bad.append(f"step {t} hess_max_ev {got} converged but not within tol of {ref}")
                continue
            se = _at(run, f"{key}/stderr", t)
            method = str(info.get("method", info.get("curvature", "")))
            if method.startswith("exact") or se == 0.0:
                paths[key] = "exact"
                if not abs(got - ref) <= 1e-4 * abs(ref) + 1e-7:
                    bad.append(f"step {t} {key} labelled exact ({method}) is {got}, dense {ref}")
            else:
                paths[key] = "estimate"
                if not (se is not None and se > 0 and abs(got - ref) <= 4 * se):
                    bad.append(f"step {t} {key} estimate {got} +- {se}, dense {ref}")
    return bad, paths


# ---------------------------------------------------------------------------------------------- models


def seeded(build: Callable[[], nn.Module], seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return build()


def mlp(act=nn.Tanh, out=3, bias=True):
    return nn.Sequential(nn.Linear(4, 6, bias=bias), act(), nn.Linear(6, out, bias=bias))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + x)


class SharedTwice(nn.Module):
    """The same Linear applied twice in a custom forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))


class EmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.b = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.e(x).mean(1)))


class UnusedBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 5), nn.Linear(5, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


V, D, T = 5, 4, 3


class TinyTransformer(nn.Module):
    """Token + learned position embedding (broadcast over the batch), one encoder layer, a head: [B, T, V]."""

    def __init__(self):
        super().__init__()
        self.emb, self.pos = nn.Embedding(V, D), nn.Parameter(torch.randn(T, D) * 0.1)
        self.layer = nn.TransformerEncoderLayer(D, 1, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        return self.head(self.layer(self.emb(x) + self.pos))


class RecurrentSeqFirst(nn.Module):
    """A sequence-first GRU / LSTM ([T, B, F] inputs) and a head on the last state."""

    def __init__(self, cls):
        super().__init__()
        self.rnn, self.head = cls(3, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][-1])


def reused_in_sequential():
    lin = nn.Linear(4, 4)
    return nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3))


def tied_in_sequential():
    a, c = nn.Linear(4, 4), nn.Linear(4, 4)
    c.weight = a.weight
    return nn.Sequential(a, nn.Tanh(), c, nn.Tanh(), nn.Linear(4, 3))


class FunctionalMSE(nn.Module):
    def forward(self, out, y):
        return ((out - y) ** 2).mean()


class FunctionalNLL(nn.Module):
    def forward(self, out, y):
        return F.nll_loss(F.log_softmax(out, -1), y)


class LogSoftmaxNet(nn.Module):
    """Ends with a functional log_softmax: NLLLoss on it is linear in the loss input (GGN split there is 0)."""

    def __init__(self):
        super().__init__()
        self.f = mlp()

    def forward(self, x):
        return F.log_softmax(self.f(x), -1)


def split_before_log_softmax(m):
    return m[:-1], (lambda o: F.log_softmax(o, -1))


def batch(seed=0, n=6, shape=(4,), classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


def tokens(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T), generator=g), torch.randint(0, V, (n, T), generator=g)


def flat_ce(out, y):
    return F.cross_entropy(out.reshape(-1, V), y.reshape(-1))


def flat_loop(model, x, y, loss_fn):
    return loss_fn(model(x).view(-1, V), y.view(-1))


Case = Tuple[nn.Module, nn.Module, Callable, list, Optional[Callable], Optional[Callable]]
