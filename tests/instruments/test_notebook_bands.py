"""``cockpit_lite.plot(run, keys=[...])`` and ``compare``: an estimate key is drawn with its error (the band or
error bars of the dashboard's ``error_band``): ``<key>/stderr`` for traces and TIC, ``hess_max_ev/error_bound``
for the top eigenvalue; exact values (error 0) get none. References: the logged value and error series."""

import numpy as np
import pytest

import cockpit_lite
from helpers import written_run
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")
from matplotlib.collections import LineCollection, PolyCollection  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sparse = tmp_path_factory.mktemp("nb_sparse")
    write_synthetic_log(sparse, 40, quantities=["loss", "hess_trace", "hess_max_ev", "tic_trace"], curvature_every=5)
    dense = tmp_path_factory.mktemp("nb_dense")
    write_synthetic_log(dense, 120, quantities=["loss", "hess_trace", "hess_max_ev", "tic_trace"], curvature_every=1)
    return cockpit_lite.load(sparse), cockpit_lite.load(dense)


def error_extent(ax, words):
    """(min, max) of the y drawn by the error artist whose label holds ``words``."""
    found = [c for c in ax.collections if words in str(c.get_label())]
    found += [c.lines[2][0] for c in ax.containers if words in str(c.get_label())]
    assert len(found) == 1, [c.get_label() for c in ax.collections] + [c.get_label() for c in ax.containers]
    art = found[0]
    if isinstance(art, LineCollection):
        ys = np.concatenate([seg[:, 1] for seg in art.get_segments()])
    else:
        assert isinstance(art, PolyCollection)
        ys = np.concatenate([p.vertices[:, 1] for p in art.get_paths()])
    return ys.min(), ys.max()


@pytest.mark.parametrize("key,err_key,words", [
    ("hess_trace", "hess_trace/stderr", "standard error"), ("tic_trace", "tic_trace/stderr", "standard error"),
    ("hess_max_ev", "hess_max_ev/error_bound", "residual bound"),
])
@pytest.mark.parametrize("which", [0, 1])
def test_plot_draws_the_error_of_an_estimate(runs, key, err_key, words, which):
    run = runs[which]
    steps, values = run.series(key)
    err_steps, err = run.series(err_key)
    e = dict(zip(err_steps.tolist(), err.tolist()))
    e = np.array([e.get(s, np.nan) for s in steps.tolist()])
    ok = np.isfinite(values) & np.isfinite(e) & (e > 0)
    assert ok.any()
    fig = cockpit_lite.plot(run, keys=[key])
    lo, hi = error_extent(fig.axes[0], words)
    assert lo == pytest.approx((values - e)[ok].min()) and hi == pytest.approx((values + e)[ok].max())


def test_compare_draws_each_runs_error_and_none_for_exact_values(runs, tmp_path):
    exact = written_run(tmp_path, [{"hess_trace": 2.0 + s, "hess_trace/stderr": 0.0} for s in range(6)])
    fig = cockpit_lite.compare([runs[0], exact], keys=["hess_trace"], labels=["estimate", "exact"])
    ax = fig.axes[0]
    labels = [str(c.get_label()) for c in list(ax.collections) + list(ax.containers)]
    assert [l for l in labels if "standard error" in l] == ["estimate: hess_trace ± 1 standard error"]
    steps, values = runs[0].series("hess_trace")
    _, err = runs[0].series("hess_trace/stderr")
    ok = np.isfinite(values) & np.isfinite(err) & (err > 0)
    lo, hi = error_extent(ax, "standard error")
    assert lo == pytest.approx((values - err)[ok].min()) and hi == pytest.approx((values + err)[ok].max())
