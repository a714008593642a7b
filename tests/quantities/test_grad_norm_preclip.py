"""``grad_norm_preclip``: the gradient norm before the user's clipping, against the norm the test itself
computes in float64 from ``.grad`` right after ``backward`` (before clipping, unscaled by the test)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import cockpit_lite
from helpers import wait_for_processes
from layout import TESTS


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batches(sizes):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 6, generator=g) * 3, torch.randint(0, 3, (n,), generator=g)) for n in sizes]


def _norms64(model):
    parts = {n: p.grad.detach().double().norm().item() for n, p in model.named_parameters()}
    return math.sqrt(sum(v * v for v in parts.values())), parts


def _steps(run):
    return [r for r in run.records if r.get("type") == "step"]


def _check(run, expected, clipped_to=None):
    steps = _steps(run)
    assert len(steps) == len(expected)
    for rec, (total, parts) in zip(steps, expected):
        v = rec["values"]
        assert v["grad_norm_preclip"] == pytest.approx(total, rel=1e-5)
        for name, x in parts.items():
            assert v[f"grad_norm_preclip/{name}"] == pytest.approx(x, rel=1e-5, abs=1e-7)
        if clipped_to is not None:  # the norm the optimizer saw is the clipped one, the pre-clip one is above it
            assert v["grad_norm"] == pytest.approx(min(clipped_to, total), rel=1e-4)
            assert total > clipped_to


def test_clip_grad_norm_logs_the_norm_before_clipping(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path) as cp:
        assert "grad_norm_preclip" in [q.name for q in cp.quantities]  # in the default preset
        for x, y in _batches([16, 16, 16]):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            expected.append(_norms64(model))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            opt.step()
    _check(cockpit_lite.load(tmp_path), expected, clipped_to=0.01)


def test_accumulated_unequal_micro_batches_give_the_norm_of_the_sum(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    data = _batches([5, 11, 7, 9])
    expected = []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip", "grad_norm"]):
        for pair in (data[:2], data[2:]):
            opt.zero_grad()
            for x, y in pair:
                (loss_fn(model(x), y) * x.shape[0] / 16).backward()
            expected.append(_norms64(model))
            torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)
            opt.step()
    run = cockpit_lite.load(tmp_path)
    _check(run, expected)
    assert all(r["backward_passes"] == 2 for r in _steps(run))


@pytest.mark.parametrize("explicit_unscale", [True, False])
def test_grad_scaler_value_is_unscaled(tmp_path, explicit_unscale):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    expected, scales = [], []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip", "grad_norm"]):
        for x, y in _batches([16, 16, 16]):
            opt.zero_grad()
            scaler.scale(loss_fn(model(x), y)).backward()
            s = scaler.get_scale()
            total, parts = _norms64(model)
            expected.append((total / s, {k: v / s for k, v in parts.items()}))
            scales.append(s)
            if explicit_unscale:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            scaler.step(opt)
            scaler.update()
    run = cockpit_lite.load(tmp_path)
    _check(run, expected, clipped_to=0.01 if explicit_unscale else None)
    assert [r["data"]["grad_norm_preclip"]["unscaled_by"] for r in _steps(run)] == scales
    if not explicit_unscale:  # nothing clipped: both read the same gradient
        for r in _steps(run):
            assert r["values"]["grad_norm_preclip"] == pytest.approx(r["values"]["grad_norm"], rel=1e-5)


def test_scaler_skipped_step_leaves_the_next_step_right(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    expected = []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip"]):
        for i, (x, y) in enumerate(_batches([16, 16, 16])):
            opt.zero_grad()
            if i == 1:
                x = x.clone()
                x[0, 0] = float("inf")
            scaler.scale(loss_fn(model(x), y)).backward()
            s = scaler.get_scale()
            if i != 1:
                total, parts = _norms64(model)
                expected.append((total / s, {k: v / s for k, v in parts.items()}))
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    run = cockpit_lite.load(tmp_path)
    assert len(run.skipped) == 1
    _check(run, expected)


def test_gradient_changed_outside_the_model_is_nan_with_reason(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip"]):
        for x, y in _batches([16, 16]):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            # a penalty back-propagated on its own, not through the model's output: not observed
            (100.0 * sum(p.pow(2).sum() for p in model.parameters())).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path)
    steps, values = run.series("grad_norm_preclip")
    assert len(steps) == 2 and all(math.isnan(v) for v in values)
    reasons = run.reasons("grad_norm_preclip")
    assert sorted(reasons) == [0, 1] and all("grew" in why for why in reasons.values())


def test_no_backward_through_the_model_is_nan_with_reason(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip"]):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
    run = cockpit_lite.load(tmp_path)
    steps, values = run.series("grad_norm_preclip")
    assert list(steps) == [0] and math.isnan(values[0])
    assert "no backward pass" in run.reasons("grad_norm_preclip")[0]


def test_ddp_value_is_the_global_batch_norm_after_all_reduce(tmp_path):
    """Two DDP processes (gloo), accumulation with ``no_sync`` and clipping: the logged value is the norm
    of the global batch's gradient (a norm read before the all-reduce would be one shard's)."""
    import json
    import os
    import subprocess
    import sys

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    worker = str(TESTS / "preclip_ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logdir = tmp_path / "log"
    procs = [subprocess.Popen([sys.executable, worker, str(r), "2", str(tmp_path / "init"), str(logdir)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    wait_for_processes(procs, "a DDP worker", timeout=120)
    expected = json.loads((logdir / "expected.json").read_text())
    steps, values = cockpit_lite.load(logdir).series("grad_norm_preclip")
    assert list(steps) == [0, 1, 2]
    for v, e in zip(values, expected):
        assert v == pytest.approx(e, rel=1e-5)
        assert e > 0.01  # clipping fired: grad_norm would be 0.01


def test_panel_draws_both_norms_labelled(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from cockpit_lite.instruments import as_view, builtin

    test_clip_grad_norm_logs_the_norm_before_clipping(tmp_path)
    run = cockpit_lite.load(tmp_path)
    panel = next(i for i in builtin() if i.name == "grad_norm_preclip")
    view = as_view(run)
    assert panel.missing(view) is None
    fig, ax = plt.subplots()
    panel.draw(ax, view)
    lines = {line.get_label(): line for line in ax.get_lines()}
    for key, label in (("grad_norm_preclip", "before clipping"), ("grad_norm", "after clipping (stepped)")):
        steps, values = run.series(key)
        np.testing.assert_allclose(lines[label].get_xdata(), steps)
        np.testing.assert_allclose(lines[label].get_ydata(), values)
    plt.close(fig)
    assert "grad_norm_preclip not in this log" in panel.missing(as_view(cockpit_lite.load(_log_without_preclip(tmp_path))))


def _log_without_preclip(tmp_path):
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logdir = tmp_path / "nopre"
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities=["grad_norm"]):
        x, y = _batches([4])[0]
        loss_fn(model(x), y).backward()
        opt.step()
    return logdir


def test_a_failure_at_the_end_of_backward_is_nan_with_the_error(tmp_path, monkeypatch):
    from cockpit_lite.quantities.grad_norm_preclip import GradNormPreclip

    def fail(self):
        raise RuntimeError("no norm today")

    monkeypatch.setattr(GradNormPreclip, "_norms_now", fail)
    model, loss_fn = _net(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip", "loss"]):
        x, y = _batches([4])[0]
        loss_fn(model(x), y).backward()
        opt.step()
    run = cockpit_lite.load(tmp_path)
    assert math.isnan(run.series("grad_norm_preclip")[1][0]) and len(run.series("loss")[1]) == 1
    assert run.reasons("grad_norm_preclip")[0] == "RuntimeError at the end of backward: no norm today"


def test_sparse_gradients(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path, quantities=["grad_norm_preclip"]):
        loss_fn(model(torch.randint(0, 10, (5, 2))), torch.randint(0, 3, (5,))).backward()
        opt.step()
    run = cockpit_lite.load(tmp_path)
    steps, values = run.series("grad_norm_preclip")
    if math.isfinite(values[0]):  # a torch whose norms take sparse gradients: then it must be right
        grads = [p.grad.to_dense().double() if p.grad.is_sparse else p.grad.double() for p in model.parameters()]
        assert values[0] == pytest.approx(torch.stack([g.norm() for g in grads]).norm().item(), rel=1e-5)
    else:
        assert "at the end of backward" in run.reasons("grad_norm_preclip")[0]
