"""Curvature of losses that are linear in (part of) their input, and of losses autograd cannot differentiate twice.

Under L1Loss, HingeEmbeddingLoss or SmoothL1Loss past beta the gradient of the last layer's bias is a constant
(a mean of signs), so it has no autograd graph. The Hessian is not 0 for all that: the hidden layers' curvature
comes through the network's second derivatives. Those gradients used to make every Hessian-vector product fail
("element 3 of tensors does not require grad"), and hess_max_ev, hess_trace and the TIC were NaN with autograd's
raw message. References: dense float64 Hessians by ``torch.autograd.functional.hessian``, eigenvalues by
``eigvalsh``. MultiMarginLoss's backward has no derivative in PyTorch at all: NaN with a reason naming the op,
not a quantity failure."""

import math
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from tests.curvature_reference import hessian

B = 8


def _setup(loss, out=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, 4, generator=g)
    if isinstance(loss, nn.HingeEmbeddingLoss):
        y = (torch.randint(0, 2, (B, out), generator=g) * 2 - 1).float()
    elif isinstance(loss, nn.MultiMarginLoss):
        y = torch.randint(0, out, (B,), generator=g)
    else:
        y = 3 * torch.randn(B, out, generator=g)  # far from the outputs: SmoothL1 in its linear part
    return model, x, y


def _run(model, loss, x, y, tmp_path, quantities):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a quantity failure warns: none allowed
        with cockpit_lite.watch(model, opt, loss_fn=loss, logdir=tmp_path / "run", quantities=quantities):
            opt.zero_grad()
            loss(model(x), y).backward()
            opt.step()
    return next(iter(cockpit_lite.load(tmp_path / "run"))), theta


LINEAR_IN_THE_OUTPUT = [nn.L1Loss(), nn.HingeEmbeddingLoss(margin=0.5), nn.SmoothL1Loss(beta=0.05)]


@pytest.mark.parametrize("loss", LINEAR_IN_THE_OUTPUT, ids=lambda m: type(m).__name__)
def test_hessian_of_a_loss_linear_in_the_output(loss, tmp_path):
    model, x, y = _setup(loss)
    rec, theta = _run(model, loss, x, y, tmp_path, ["hess_max_ev", "hess_trace"])
    H = hessian(model, lambda o, t: type(loss)(**_kwargs(loss)).double()(o, t), x, y, theta)
    # the premise: a nonzero Hessian although the last bias's gradient is constant
    assert H.abs().max() > 1e-3
    top = float(torch.linalg.eigvalsh(H).max())
    got = rec["values"]["hess_max_ev"]
    assert math.isfinite(got), rec["reasons"].get("hess_max_ev")
    assert abs(got - top) <= 1e-3 * abs(top) + 1e-6, (got, top)
    tr, se = rec["values"]["hess_trace"], rec["values"]["hess_trace/stderr"]
    assert math.isfinite(tr) and se > 0, rec["reasons"].get("hess_trace")
    assert abs(tr - float(H.trace())) <= 4 * se, (tr, se, float(H.trace()))


def _kwargs(loss):
    if isinstance(loss, nn.HingeEmbeddingLoss):
        return {"margin": loss.margin}
    if isinstance(loss, nn.SmoothL1Loss):
        return {"beta": loss.beta}
    return {}


def test_a_loss_autograd_cannot_differentiate_twice(tmp_path):
    loss = nn.MultiMarginLoss(p=2, margin=2.0)
    model, x, y = _setup(loss)
    names = ["hess_max_ev", "hess_trace", "ggn_trace", "tic_trace"]
    rec, _ = _run(model, loss, x, y, tmp_path, names + ["grad_norm"])
    assert math.isfinite(rec["values"]["grad_norm"])
    for key in names:
        assert math.isnan(float(rec["values"][key])), (key, rec["values"][key])
        reason = rec["reasons"][key]
        assert "multi_margin_loss_backward" in reason and "no derivative" in reason, reason
