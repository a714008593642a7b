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
