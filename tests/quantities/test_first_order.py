"""Each first-order quantity against a direct computation in an unwatched twin of the same loop."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite


def make(seed=0, dropout=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(0.3))
    layers += [nn.Linear(16, 4)]
    return nn.Sequential(*layers)


def batches(n, bs=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 6, generator=g), torch.randint(0, 4, (bs,), generator=g)) for _ in range(n)]


OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_quantities_match_direct_computation(opt_name, logdir):
    data = batches(5)
    crit = nn.CrossEntropyLoss()

    # reference: the same loop, unwatched, computing every quantity by hand
    model = make()
    opt = OPTIMIZERS[opt_name](model.parameters())
    theta0 = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    expected = {k: [] for k in ("loss", "grad_norm", "param_norm", "distance", "update_size", "lr")}
    for x, y in data:
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        expected["loss"].append(loss.item())
        expected["grad_norm"].append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        expected["param_norm"].append(flat.norm().item())
        expected["distance"].append((flat - theta0).norm().item())
        expected["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        expected["update_size"].append((torch.cat([p.detach().flatten() for p in model.parameters()]) - flat).norm().item())

    model = make()
    opt = OPTIMIZERS[opt_name](model.parameters())
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for x, y in data:
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()

    run = cockpit_lite.load(logdir)
    assert len(run) == 5 and run.finished
    for key, want in expected.items():
        steps, got = run.series(key)
        assert list(steps) == [0, 1, 2, 3, 4], key
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=key)
    # per-parameter parts add up to the total
    steps, total = run.series("grad_norm")
    parts = [run.series(f"grad_norm/{n}")[1] for n, _ in model.named_parameters()]
    np.testing.assert_allclose(np.sqrt(sum(p**2 for p in parts)), total, rtol=1e-6)
    _, t = run.series("time")
    _, own = run.series("time/cockpit")
    assert np.all(t > 0) and np.all(own >= 0) and np.all(own <= t)


def test_param_groups_and_lr_scheduler(logdir):
    model = make()
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": model[2].parameters(), "lr": 0.01}], momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for x, y in batches(5):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
            sched.step()
    run = cockpit_lite.load(logdir)
    np.testing.assert_allclose(run.series("lr/group0")[1], [0.1, 0.1, 0.05, 0.05, 0.025])
    np.testing.assert_allclose(run.series("lr/group1")[1], [0.01, 0.01, 0.005, 0.005, 0.0025])
    np.testing.assert_allclose(run.series("lr")[1], run.series("lr/group0")[1])


def test_sum_reduction_loss_and_plain_function_warning(logdir):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss(reduction="sum")
    x, y = batches(1)[0]
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
    assert cockpit_lite.load(logdir).series("loss")[1][0] == pytest.approx(loss.item(), rel=1e-6)

    model2 = make()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.01)
    with pytest.warns(UserWarning, match="plain function"):
        c = cockpit_lite.watch(model2, opt2, loss_fn=nn.functional.cross_entropy, logdir=logdir.parent / "fn")
    opt2.zero_grad()
    nn.functional.cross_entropy(model2(x), y).backward()
    opt2.step()
    c.close()
    run = cockpit_lite.load(logdir.parent / "fn")
    assert math.isnan(run.series("loss")[1][0])
    assert "loss_fn" in run.reasons("loss")[0]
    assert run.series("grad_norm")[1][0] > 0


def test_schedules_select_the_steps(logdir):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    qs = {"loss": "every", "grad_norm": "every:3", "distance": cockpit_lite.schedules.at([1, 4]), "lr": "log:2"}
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=qs):
        for x, y in batches(12):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(logdir)
    assert list(run.series("loss")[0]) == list(range(12))
    assert list(run.series("grad_norm")[0]) == [0, 3, 6, 9]
    assert list(run.series("distance")[0]) == [1, 4]
    assert list(run.series("lr")[0]) == [0, 1, 3, 10]
    assert run.header["quantities"]["grad_norm"]["schedule"] == "every:3"


def test_untracked_steps_write_nothing(logdir):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities={"loss": "every:5"}):
        for x, y in batches(11):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(logdir)
    assert [r["step"] for r in run] == [0, 5, 10]
    assert run.footer["steps"] == 11
