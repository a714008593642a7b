"""Gradients too small for float32 statistics (persample/underflow.py): that parameter's per-sample values are
NaN with the reason naming its module; the others keep their values (float64 brute force)."""

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from reference import flat, norm_test, per_sample_grads_bruteforce


class TinySide(nn.Module):
    """head(x) + scale * side(x): side's gradients are ``scale`` times the head's."""

    def __init__(self, scale):
        super().__init__()
        self.head, self.side, self.scale = nn.Linear(6, 3), nn.Linear(6, 3), scale

    def forward(self, x):
        return self.head(x) + self.scale * self.side(x)


@pytest.mark.parametrize("scale", [1e-21, 1e-27])  # 1e-27: every square flushes, the float32 norm is 0
def test_tiny_gradients_are_nan_with_the_module(tmp_path, scale):
    torch.manual_seed(0)
    model, crit = TinySide(scale), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    head = [model.head.weight, model.head.bias]
    G = flat(per_sample_grads_bruteforce(model, nn.CrossEntropyLoss(reduction="none"), x, y, params=head))
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=str(tmp_path), quantities={"norm_test": "every"}):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    run = cockpit_lite.load(str(tmp_path))
    reasons = next(iter(run))["reasons"]
    for name in ("side.weight", "side.bias"):
        assert np.isnan(dict(zip(*run.series(f"norm_test/{name}")))[0])
        assert "too small for float32" in reasons[f"norm_test/{name}"] and "'side'" in reasons[f"norm_test/{name}"]
    ref_w = norm_test(G[:, :18])
    assert dict(zip(*run.series("norm_test/head.weight")))[0] == pytest.approx(ref_w, rel=1e-4)


@pytest.mark.parametrize("scale", [1e-21, 1e-27])
def test_the_tests_totals_leave_a_negligible_tiny_parameter_out(tmp_path, scale):
    """The norm, inner-product and orthogonality tests' totals are sums over the samples: side's share of them is
    below float32's rounding, so they keep their (float64 brute force) values; mean_gsnr's total averages a ratio
    over every element, side's included, and stays NaN with side's reason (CaiT's LayerScale 1e-5, BART's and
    EdgeNeXt's tiny gradients made every total NaN)."""
    from reference import inner_test, ortho_test

    torch.manual_seed(0)
    model, crit = TinySide(scale), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    G = flat(per_sample_grads_bruteforce(model.double(), nn.CrossEntropyLoss(reduction="none"), x.double(), y))
    model.float()
    quantities = {q: "every" for q in ("norm_test", "inner_test", "ortho_test", "mean_gsnr")}
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=str(tmp_path), quantities=quantities):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    record = next(iter(cockpit_lite.load(str(tmp_path))))
    for q, ref in (("norm_test", norm_test), ("inner_test", inner_test), ("ortho_test", ortho_test)):
        assert record["values"][q] == pytest.approx(ref(G), rel=1e-4), q
        assert "too small for float32" in record["reasons"][f"{q}/side.weight"]
    assert np.isnan(float(record["values"]["mean_gsnr"]))
    assert "too small for float32" in record["reasons"]["mean_gsnr"]
