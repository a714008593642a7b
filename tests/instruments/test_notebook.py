"""Notebook helpers: ``plot``/``compare`` figures hold exactly ``run.series``; ``Run._repr_html_``;
the gradient-flow panel draws the per-parameter norms of the log."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

import cockpit_lite
from helpers import watched_training
from cockpit_lite.instruments import RunView, builtin


def _train(logdir, lr=0.1, steps=6, seed=0):
    torch.manual_seed(seed)
    model, loss_fn = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]

    def grad_norms(_step):
        _train.last_grad_norms = [p.grad.double().norm().item() for p in model.parameters()]

    return watched_training(model, opt, loss_fn, batches, logdir, after_backward=grad_norms).run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nb")
    a = _train(tmp / "a")
    a.last_grad_norms = _train.last_grad_norms  # .grad of the last step, read by the test in float64
    return a, _train(tmp / "b", lr=0.5, steps=4, seed=1)


def _lines(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_keys_draws_each_series(runs):
    run = runs[0]
    fig = cockpit_lite.plot(run.logdir, keys=["loss", "grad_norm"])
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["loss", "grad_norm"]
    for ax, key in zip(axes, ["loss", "grad_norm"]):
        (line,) = ax.get_lines()
        steps, values = run.series(key)
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), values)


def test_plot_steps_range_and_typo(runs):
    run = runs[0]
    fig = cockpit_lite.plot(run, keys=["loss"], steps="2:5")
    (line,) = fig.get_axes()[0].get_lines()
    steps, values = run.series("loss", start=2, stop=5)
    np.testing.assert_array_equal(line.get_xdata(), steps)
    np.testing.assert_array_equal(line.get_ydata(), values)
    with pytest.raises(KeyError, match="grad_norm"):
        cockpit_lite.plot(run, keys=["grad_nrom"])


def test_plot_without_keys_is_the_dashboard(runs):
    fig = cockpit_lite.plot(runs[0])
    titles = {ax.get_title() for ax in fig.get_axes()}
    assert "Gradient norm, before / after clipping" in titles and "Gradient flow per layer" in titles


def test_compare_overlays_the_runs(runs):
    a, b = runs
    fig = cockpit_lite.compare([a.logdir, b], keys=["loss", "grad_norm_preclip"], labels=["small lr", "large lr"])
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax, key in zip(axes, ["loss", "grad_norm_preclip"]):
        lines = _lines(ax)
        assert set(lines) == {"small lr", "large lr"}
        for run, label in ((a, "small lr"), (b, "large lr")):
            steps, values = run.series(key)
            np.testing.assert_array_equal(lines[label].get_xdata(), steps)
            np.testing.assert_array_equal(lines[label].get_ydata(), values)
        assert ax.get_legend() is not None
    with pytest.raises(ValueError):
        cockpit_lite.compare([a, b], keys=["loss"], labels=["one"])


def test_repr_html_summarises_the_run(runs):
    run = runs[0]
    text = run._repr_html_()
    assert "finished" in text and "Sequential" in text and "SGD" in text
    assert "<code>grad_norm_preclip</code>" in text and "grad_norm/" not in text
    steps, loss = run.series("loss")
    assert f"<td>{len(steps)}</td><td>{loss[-1]:.4g}</td>" in text
    assert f"{len(steps)} (steps 0–{len(steps) - 1})" in text


def test_grad_flow_panel_draws_per_parameter_norms_in_model_order(runs):
    run = runs[0]
    panel = next(i for i in builtin() if i.name == "grad_flow")
    view = RunView(run)
    assert panel.missing(view) is None
    fig = Figure()
    ax = fig.add_subplot()
    panel.draw(ax, view)
    names = [p["name"] for p in run.header["params"]]
    series = [run.series(f"grad_norm/{n}")[1] for n in names]
    lines = _lines(ax)
    np.testing.assert_allclose(lines["last step"].get_ydata(), [s[-1] for s in series])
    np.testing.assert_allclose(lines["median over the range"].get_ydata(), [np.median(s) for s in series])
    assert [t.get_text() for t in ax.get_xticklabels()] == names
    # against the gradients themselves: the last step's norms are those of .grad, in model order
    np.testing.assert_allclose(lines["last step"].get_ydata(), run.last_grad_norms, rtol=1e-5)


def test_grad_flow_says_why_without_per_parameter_values(tmp_path):
    torch.manual_seed(0)
    model, loss_fn = nn.Linear(3, 1, bias=False), nn.MSELoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path):
        loss_fn(model(torch.randn(4, 3)), torch.randn(4, 1)).backward()
        opt.step()
    panel = next(i for i in builtin() if i.name == "grad_flow")
    assert "single parameter tensor" in panel.missing(RunView(cockpit_lite.load(tmp_path)))
