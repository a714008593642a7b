"""Issue 20 item 5: NLLLoss after LogSoftmax. NLL is linear in the log-probabilities, so a GGN split at
the loss input is 0 (it was logged as 0.0 +- 0.0). The GGN is now split at the LogSoftmax's input, where
the curvature lives; where that cannot be found (a functional log_softmax), ggn_trace is NaN with the
reason. Reference: the dense float64 GGN J^T H_L J with J the Jacobian of the logits
(tests/curvature_reference.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cockpit_lite.quantities.ggn_trace import GGNTrace
from cockpit_lite.quantities.hess_trace import HessTrace
from curvature_reference import ggn, hessian, one_step, record, value


def _body(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def _batch(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


class CustomWithModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _body()
        self.out = nn.LogSoftmax(dim=-1)

    def forward(self, x):
        return self.out(self.body(x))


class CustomFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = _body()

    def forward(self, x):
        return torch.log_softmax(self.body(x), dim=-1)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("kind", ["sequential", "custom_module"])
def test_ggn_of_nll_after_logsoftmax_is_split_at_the_logits(tmp_path, kind):
    model = nn.Sequential(_body(), nn.LogSoftmax(dim=1)) if kind == "sequential" else CustomWithModule()
    x, y = _batch()
    probes = 3 * _n_params(model)  # Hutch++ with a sketch spanning the whole space: exact up to rounding
    run, theta = one_step(model, nn.NLLLoss(), x, y, [GGNTrace("every", method="hutch++", probes=probes),
                                                      HessTrace("every", probes=30)], tmp_path / "r")
    split = (lambda m: (m[0], m[1])) if kind == "sequential" else (lambda m: (m.body, m.out))
    G = ggn(model, nn.NLLLoss(), x, y, theta, split=split)
    truth = float(torch.trace(G))
    assert truth > 1e-3
    assert value(run, "ggn_trace") == pytest.approx(truth, rel=1e-4)
    assert record(run, "ggn_trace")["ggn_split"] == "input of LogSoftmax"
    H = hessian(model, nn.NLLLoss(), x, y, theta)
    assert abs(value(run, "hess_trace") - float(torch.trace(H))) <= 4 * value(run, "hess_trace/stderr")


def test_nll_after_functional_log_softmax_is_nan_with_reason(tmp_path):
    model = CustomFunctional()
    x, y = _batch(1)
    run, _ = one_step(model, nn.NLLLoss(), x, y, [GGNTrace("every"), HessTrace("every")], tmp_path / "r")
    assert math.isnan(value(run, "ggn_trace")) and "linear in its input" in run.reasons("ggn_trace")[0]
    assert math.isfinite(value(run, "hess_trace"))


def test_cross_entropy_ggn_products_are_exact(tmp_path):
    """The plain split (CrossEntropyLoss on logits, a model BackPACK cannot take) against the dense GGN."""
    model = CustomWithModule().body
    model = nn.Sequential(nn.LayerNorm(4), model)
    x, y = _batch(2)
    probes = 3 * _n_params(model)
    run, theta = one_step(model, nn.CrossEntropyLoss(), x, y, [GGNTrace("every", method="hutch++", probes=probes)],
                          tmp_path / "r")
    G = ggn(model, nn.CrossEntropyLoss(), x, y, theta)
    assert value(run, "ggn_trace") == pytest.approx(float(torch.trace(G)), rel=1e-4)
    assert "ggn_split" not in record(run, "ggn_trace")
