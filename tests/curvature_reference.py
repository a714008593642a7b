"""Dense float64 references for the curvature tests: the Hessian of the one-batch loss by
``torch.autograd.functional.hessian`` and the GGN J^T H_L J from ``torch.autograd.functional.jacobian``,
both over the flattened parameters, independent of cockpit_lite's HVP and BackPACK code."""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.func import functional_call

import cockpit_lite


def split_flat(flat, names, shapes):
    """{name: view of ``flat``}: the flattened parameters cut back into their shapes."""
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = math.prod(s)
        out[n] = flat[i:i + k].view(s)
        i += k
    return out


def _double(model, theta):
    m = copy.deepcopy(model).double()
    names = list(theta)
    shapes = [tuple(theta[n].shape) for n in names]
    flat = torch.cat([theta[n].reshape(-1) for n in names]).double()
    return m, names, shapes, flat


def _d(t):
    return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def hessian(model, loss64: Callable, x, y, theta: Dict[str, torch.Tensor]) -> torch.Tensor:
    """Dense H of loss64(model(x), y) w.r.t. the parameters named in ``theta`` (others held fixed)."""
    m, names, shapes, flat = _double(model, theta)
    return torch.autograd.functional.hessian(lambda f: loss64(functional_call(m, split_flat(f, names, shapes), (_d(x),)),
                                                               _d(y)), flat)


def ggn(model, loss64: Callable, x, y, theta, split: Optional[Callable[[nn.Module], nn.Module]] = None):
    """Dense GGN J^T H_L J, the split at the model output (or at ``split(model)``'s output with the rest of the
    model folded into the loss, e.g. a trailing LogSoftmax)."""
    m, names, shapes, flat = _double(model, theta)
    head, tail = (m, nn.Identity()) if split is None else split(m)
    out_of = lambda f: functional_call(head, {k[len(prefix):]: v for k, v in split_flat(f, names, shapes).items()},
                                       (_d(x),))
    prefix = "" if split is None else next(n for n, mod in m.named_modules() if mod is head) + "."
    out = out_of(flat)
    J = torch.autograd.functional.jacobian(out_of, flat).reshape(out.numel(), -1)
    HL = torch.autograd.functional.hessian(lambda o: loss64(tail(o.view_as(out)), _d(y)), out.detach().reshape(-1))
    return J.T @ HL @ J


class LayerNormNet(nn.Module):
    """LayerNorm(4) -> Linear(4, 6) -> ``act`` -> Linear(6, 3) in a custom forward: a model BackPACK gives no
    exact Hessian diagonal for (the curvature estimators take over)."""

    def __init__(self, act):
        super().__init__()
        self.act = act
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


def one_step(model, loss_fn, x, y, quantities, logdir, lr=0.0):
    """One SGD step watched by cockpit-lite; returns (run, theta_t)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    cockpit = cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities=quantities)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    cockpit.close()
    return cockpit_lite.load(logdir), theta


def value(run, key, step=0):
    steps, values = run.series(key)
    return float(values[list(steps).index(step)])


def record(run, key, step=0) -> dict:
    return dict(next(d for s, d in run.data(key) if s == step))
