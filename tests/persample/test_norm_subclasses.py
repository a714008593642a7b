"""Subclasses of the stock norms with their own ``forward`` (timm's GroupNorm1 and LayerNorm call F.group_norm /
F.layer_norm themselves). One that gives the stock output is served by the stock rule (``rules.same_as_stock``),
which knows the terms of its bias's sum over positions: in a PoolFormer block (token mixer pool(x) - x) that sum
cancels to 0, and the bias's per-sample values are NaN as rounding noise. Through the torch.func fallback they
were logged as values (norm_test 0.92 where float64 references gave 0.91 to 1.06: noise). One whose forward
differs stays with the fallback. Values against a float64 reference (vmap of grad, no batch-of-one kernels)."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import reference as R
from cockpit_lite.persample.rules import same_as_stock
from helpers import watched_training


class GroupNorm1(nn.GroupNorm):
    """timm's: one group, its own forward calling the functional."""

    def __init__(self, channels):
        super().__init__(1, channels)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class DoubledGroupNorm(GroupNorm1):
    def forward(self, x):
        return 2 * super().forward(x)


class PoolBlock(nn.Module):
    """PoolFormer's block: x + mixer(norm(x)) with mixer(h) = avgpool(h) - h, then a channel MLP and a head."""

    def __init__(self, norm):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = norm(4)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.mlp = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.norm(x)
        x = x + self.pool(h) - h
        return self.head(torch.tanh(self.mlp(x)).mean((2, 3)))


def _run(tmp_path, norm):
    torch.manual_seed(0)
    model = PoolBlock(norm)
    with torch.no_grad():
        model.norm.weight.normal_()
        model.norm.bias.normal_()
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 3, (4,))
    m64 = PoolBlock(norm).double()
    m64.load_state_dict(model.state_dict())
    params = {k: v.detach() for k, v in m64.named_parameters()}

    def loss_i(p, xi, yi):
        return F.cross_entropy(functional_call(m64, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    G = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x.double(), y)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trained = watched_training(model, opt, nn.CrossEntropyLoss(), [(x, y)], tmp_path / "run",
                                   quantities={"norm_test": "every", "inner_test": "every"})
    return model, G, trained.run.records[0]


def test_a_subclass_giving_the_stock_output_is_served_by_the_rule(tmp_path):
    model, G, record = _run(tmp_path, GroupNorm1)
    assert same_as_stock(model.norm, torch.randn(2, 4, 5, 5))
    values, reasons = record["values"], record.get("reasons", {})
    assert math.isnan(float(values["norm_test/norm.bias"]))
    assert "rounding noise" in reasons["norm_test/norm.bias"]
    for name in ("norm.weight", "stem.weight", "mlp.weight", "head.weight"):
        for q in ("norm_test", "inner_test"):
            assert values[f"{q}/{name}"] == pytest.approx(getattr(R, q)(G[name].reshape(4, -1)), rel=1e-4), (q, name)


def test_a_subclass_with_another_output_keeps_the_fallback(tmp_path):
    model, G, record = _run(tmp_path, DoubledGroupNorm)
    assert not same_as_stock(model.norm, torch.randn(2, 4, 5, 5))
    values = record["values"]
    for name in ("norm.weight", "stem.weight", "head.weight"):
        assert values[f"norm_test/{name}"] == pytest.approx(R.norm_test(G[name].reshape(4, -1)), rel=1e-4), name
