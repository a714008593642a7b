"""alpha carries its error: ``alpha/stderr``, the first-order (delta method) standard error of the fit from the
noise of its four observations (means over the batches, variance var / n each).

Reference: the spread of alpha over fits to observations drawn with exactly that noise (Monte Carlo with the
same fit), independent of the formula. Where the noise is small against the slope the first-order error is
within a few percent of it."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.alpha_fit import alpha_stderr, fit_alpha


@pytest.mark.parametrize("obs", [
    (0.5, 2.0, 1.7, -1.0, -0.2, 0.5, 0.4, 2.0, 1.5, 128, 128),
    (0.3, 1.0, 0.9, -0.8, 0.1, 0.2, 0.3, 0.5, 0.6, 256, 512),  # batches of different sizes: the sandwich form
    (0.2, 1.0, 0.97, -0.3, -0.1, 0.0, 0.1, 0.05, 0.08, 1024, 1024),  # a zero variance (1e-10 in the weights)
])
def test_the_standard_error_is_the_spread_of_the_fit_under_its_noise(obs):
    t, f0, f1, df0, df1, vf0, vf1, vd0, vd1, n0, n1 = obs
    fit = fit_alpha(t, f0, f1, df0, df1, vf0, vf1, vd0, vd1)
    assert fit.case == "fit"
    se = alpha_stderr(t, fit.w, (vf0, vf1), (vd0, vd1), (n0, n1))
    rng = np.random.default_rng(0)
    sd = np.sqrt(np.array([vf0 / n0, vf1 / n1, vd0 / n0, vd1 / n1]))
    mean = np.array([f0, f1, df0, df1])
    sims = np.array([fit_alpha(t, *(mean + rng.normal(size=4) * sd), vf0, vf1, vd0, vd1).alpha
                     for _ in range(20000)])
    assert se == pytest.approx(float(np.std(sims)), rel=0.08)


def test_no_error_without_a_batch_of_two():
    fit = fit_alpha(0.5, 2.0, 1.7, -1.0, -0.2, 0.5, 0.4, 2.0, 1.5)
    assert math.isnan(alpha_stderr(0.5, fit.w, (0.5, 0.4), (2.0, 1.5), (1, 128)))


def test_a_run_logs_the_error_of_each_fitted_alpha_and_the_trace_draws_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cockpit_lite.instruments.alpha_trace import AlphaTrace
    from cockpit_lite.instruments._run_view import as_view

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["alpha"]):
        for _ in range(8):
            x, y = torch.randn(32, 5, generator=g), torch.randint(0, 3, (32,), generator=g)
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    fitted = {s for s, d in run.data("alpha") if d.get("case") == "fit"}
    assert fitted
    steps, se = run.series("alpha/stderr")
    assert set(steps.tolist()) == fitted and (se > 0).all() and np.isfinite(se).all()
    for s, d in run.data("alpha"):  # the logged error is the formula's on the logged observations
        if s in fitted:
            want = alpha_stderr(d["t"], d["w"], (d["var_f0"], d["var_f1"]), (d["var_df0"], d["var_df1"]),
                                (d["n0"], d["n1"]))
            assert se[list(steps).index(s)] == pytest.approx(want, rel=1e-9)
    fig, ax = plt.subplots()
    AlphaTrace().draw(ax, as_view(run))
    labels = [h.get_label() for h in ax.get_legend_handles_labels()[0]]
    assert any("s.e." in label for label in labels), labels
    plt.close(fig)
