"""Two heads read as column slices of one output tensor: the same samples, not twice as many.

``crit(o[:, :3], y1) + crit(o[:, 3:], y2)`` was counted as 2B samples and logged (L1 + L2) / 2, half the
loop's loss, as if valid. Sample i's loss is l1_i + l2_i, as for a model returning the two heads as a tuple
(tests/engine/test_unseen_loops.py::test_two_losses_on_the_same_batch). Where the loop weighs the heads
unequally (0.3 l1 + 0.7 l2) the overall scale of that sum is not known: NaN with the reason."""

import math

import pytest
import torch
from torch import nn

import cockpit_lite

B = 6


def _run(tmp_path, weights=(1.0, 1.0), take=lambda o: (o[:, :3], o[:, 3:]), width=6):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, 4, generator=g)
    y1, y2 = torch.randint(0, 3, (B,), generator=g), torch.randint(0, 3, (B,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, width))
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with torch.no_grad():  # the reference: the loop's loss, by hand in float64
        a, b = take(net.double()(x.double()))
        ref = [float(nn.functional.cross_entropy(a, y1)), float(nn.functional.cross_entropy(b, y2))]
    net.float()
    with cockpit_lite.watch(net, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss", "norm_test"]):
        opt.zero_grad()
        a, b = take(net(x))
        (weights[0] * crit(a, y1) + weights[1] * crit(b, y2)).backward()
        opt.step()
    return next(iter(cockpit_lite.load(tmp_path / "run"))), ref


@pytest.mark.parametrize("layout", ["columns", "strided columns", "rows and columns of a 3-D output"])
def test_column_heads_are_the_same_samples(tmp_path, layout):
    take, width = {
        "columns": (lambda o: (o[:, :3], o[:, 3:]), 6),
        "strided columns": (lambda o: (o[:, 0::2], o[:, 1::2]), 6),
        "rows and columns of a 3-D output": (lambda o: (o.view(B, 2, 4)[:, 0, :3], o.view(B, 2, 4)[:, 1, 1:]), 8),
    }[layout]
    rec, ref = _run(tmp_path, take=take, width=width)
    assert rec["samples"] == B
    assert rec["values"]["loss"] == pytest.approx(ref[0] + ref[1], rel=1e-6)
    assert "same samples" in rec["reasons"]["norm_test"]  # the two calls' parts cannot be separated per sample


def test_unequally_weighted_heads_leave_the_loss_nan(tmp_path):
    rec, _ = _run(tmp_path, weights=(0.3, 0.7))
    assert rec["values"]["loss"] == "NaN"
    assert "weighed them unequally (0.429 : 1)" in rec["reasons"]["loss"]
    assert rec["samples"] == B


def test_one_head_on_a_column_slice_is_one_micro_batch(tmp_path):
    """A single loss on part of each row (the last position of a sequence output) reads B samples once."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(B, 4, generator=g), torch.randint(0, 3, (B,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 12), nn.Unflatten(1, (4, 3)))
    ref = [p.detach().double() for p in net.parameters()]  # norm_test by autograd, one sample at a time
    G = []
    for i in range(B):
        W, b = [t.clone().requires_grad_() for t in ref]
        li = nn.functional.cross_entropy((x[i:i + 1].double() @ W.T + b).view(1, 4, 3)[:, -1], y[i:i + 1])
        G.append(torch.cat([t.reshape(-1) for t in torch.autograd.grad(li, [W, b])]))
    G = torch.stack(G)
    gbar = G.mean(0)
    norm_test = math.sqrt(((G ** 2).sum() / (gbar @ gbar) - B) / (B * (B - 1)))
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with cockpit_lite.watch(net, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss", "norm_test"]):
        opt.zero_grad()
        loss = crit(net(x)[:, -1], y)
        loss.backward()
        opt.step()
    rec = next(iter(cockpit_lite.load(tmp_path / "run")))
    assert rec["samples"] == B and rec["values"]["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert rec["values"]["norm_test"] == pytest.approx(norm_test, rel=1e-4)


def test_equal_heads_over_micro_batches_of_unequal_size(tmp_path):
    """Accumulation over micro-batches of 4 and 2 samples, each scaled by its share n_k / N, two column heads of
    equal weight in each: the calls on the same samples have equal factors (only micro-batches differ), so the
    loss is the loop's total sum_k (n_k / N) (L1_k + L2_k), not NaN as 'weighed unequally'."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 4, generator=g)
    y1, y2 = torch.randint(0, 3, (6,), generator=g), torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6))
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    total = 0.0
    with cockpit_lite.watch(net, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss"]):
        opt.zero_grad()
        for part in (slice(0, 4), slice(4, 6)):
            o = net(x[part])
            share = (part.stop - part.start) / 6
            loss = share * (crit(o[:, :3], y1[part]) + crit(o[:, 3:], y2[part]))
            total += float(loss)
            loss.backward()
        opt.step()
    rec = next(iter(cockpit_lite.load(tmp_path / "run")))
    assert rec["values"]["loss"] == pytest.approx(total, rel=1e-6)
