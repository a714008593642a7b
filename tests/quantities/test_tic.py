"""tic_diag / tic_trace against a brute-force reference: per-sample gradients by a loop of
autograd.grad (tests/reference.py) and the Hessian diagonal from the dense Hessian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cockpit_lite.curvature.tic import EPS
from cockpit_lite.quantities.tic_diag import TICDiag
from cockpit_lite.quantities.tic_trace import TICTrace
from curvature_reference import LayerNormNet, one_step
from reference import per_sample_grads_bruteforce
from test_curvature import data, dense_hessian, tanh_mlp


def reference_tic(model_fresh, loss_fn, x, y, theta):
    model_fresh.load_state_dict(theta, strict=False)
    params = list(model_fresh.parameters())
    G = per_sample_grads_bruteforce(model_fresh, type(loss_fn)(reduction="none"), x, y, params)
    m = torch.cat([(g.double() ** 2).mean(0).reshape(-1) for g in G])
    H, _, _ = dense_hessian(model_fresh, loss_fn, [(x, y)], theta)
    c = torch.diagonal(H)
    return float((m / (c + EPS)).sum()), float(m.sum() / (c.sum() + EPS)), float((m / (c + EPS)).abs().sum())


def _one_step(model, loss_fn, x, y, qs, logdir):
    return one_step(model, loss_fn, x, y, qs, logdir, lr=0.05)


def test_tic_with_exact_hessian_diagonal_matches_bruteforce(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(3, n=10)
    run, theta = _one_step(model, loss_fn, x, y, [TICDiag("every"), TICTrace("every")], tmp_path / "r")
    ref_diag, ref_trace, ref_abs = reference_tic(nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)),
                                                 loss_fn, x, y, theta)
    assert run.series("tic_diag")[1][0] == pytest.approx(ref_diag, rel=1e-4)
    assert run.series("tic_trace")[1][0] == pytest.approx(ref_trace, rel=1e-5)
    info = run.data("tic_diag")[0][1]
    assert info.pop("abs_terms") == pytest.approx(ref_abs, rel=1e-4)  # the scale of its rounding error
    assert info == {"curvature": "exact:backpack-diag-hessian", "probes": 0}


def LNNet():
    """LayerNorm in a custom forward: BackPACK cannot give its Hessian diagonal."""
    return LayerNormNet(torch.relu)


def test_tic_without_backpack_uses_a_labelled_hutchinson_estimate(tmp_path):
    torch.manual_seed(1)
    model = LNNet()
    loss_fn = nn.CrossEntropyLoss()
    x, y = data(4, n=10)
    probes = 100
    run, theta = _one_step(model, loss_fn, x, y, [TICTrace("every", probes=probes)], tmp_path / "r")
    assert run.data("tic_trace")[0][1] == {"curvature": "estimate:hutchinson-diag-hessian", "probes": probes}
    torch.manual_seed(1)
    fresh = LNNet()
    fresh.load_state_dict(theta)
    G = per_sample_grads_bruteforce(fresh, nn.CrossEntropyLoss(reduction="none"), x, y, list(fresh.parameters()))
    m_sum = float(sum((g.double() ** 2).mean(0).sum() for g in G))
    H, _, _ = dense_hessian(LNNet(), loss_fn, [(x, y)], theta)
    # tic_trace = sum_j m_j / (T_est + eps), T_est a Hutchinson trace estimate with Rademacher variance
    # 2 (||H||_F^2 - sum_j H_jj^2) per probe: check T_est against tr(H) within 3 standard errors
    t_est = m_sum / run.series("tic_trace")[1][0] - EPS
    se = math.sqrt(2 * float((H ** 2).sum() - torch.diagonal(H).pow(2).sum()) / probes)
    assert abs(t_est - float(torch.trace(H))) <= 3 * se


def test_tic_unavailable_is_nan_with_reason(tmp_path):
    model = tanh_mlp()
    loss_fn = nn.CrossEntropyLoss(reduction="none")

    class MeanOf(nn.Module):  # a reduction the per-sample code does not know
        reduction = "custom"

        def forward(self, out, y):
            return loss_fn(out, y).mean()

    x, y = data(0)
    crit = MeanOf()
    run, _ = _one_step(model, crit, x, y, [TICDiag("every"), "loss"], tmp_path / "r")
    assert math.isnan(run.series("tic_diag")[1][0]) and run.reasons("tic_diag")[0]
    assert math.isfinite(run.series("loss")[1][0])
