"""``_error_band.error_band`` on long runs: more points than ``max_points`` are thinned for display, and the
band still covers value ± error of every logged step (references: ``Run.series`` of the value and its error)."""

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")
from matplotlib.collections import PolyCollection  # noqa: E402
from picture_checks import draw_panel  # noqa: E402

STEPS = 5100  # above error_band's max_points (5000)


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("long_band")
    write_synthetic_log(d, STEPS, quantities=["loss", "hess_trace", "hess_max_ev", "tic_trace"], curvature_every=1)
    return cockpit_lite.load(d)


def draw(name, run):
    return draw_panel(name, run)


@pytest.mark.parametrize("name,key,err_key,words", [
    ("traces", "hess_trace", "hess_trace/stderr", "standard error"),
    ("tic", "tic_trace", "tic_trace/stderr", "standard error"),
    ("hess_max_ev", "hess_max_ev", "hess_max_ev/error_bound", "residual bound"),
])
def test_band_of_a_long_run_is_drawn_and_covers_every_step(long_run, name, key, err_key, words):
    steps, values = long_run.series(key)
    err_steps, err = long_run.series(err_key)
    assert len(err_steps) > 5000 and (err > 0).any()
    ax = draw(name, long_run)
    bands = [c for c in ax.collections if isinstance(c, PolyCollection) and words in str(c.get_label())]
    assert len(bands) == 1, [c.get_label() for c in ax.collections]
    ys = np.concatenate([p.vertices[:, 1] for p in bands[0].get_paths()])
    xs = np.concatenate([p.vertices[:, 0] for p in bands[0].get_paths()])
    e = dict(zip(err_steps.tolist(), err.tolist()))
    e = np.array([e[s] for s in steps.tolist()])
    lo, hi = values - e, values + e
    assert ys.max() == pytest.approx(np.nanmax(hi)) and ys.min() == pytest.approx(np.nanmin(lo))
    assert xs.min() == steps[0] and xs.max() == steps[-1]
    # thinned, not dropped: at each logged step the band reaches at least value ± error
    top, bottom = {}, {}
    for x, y in zip(xs.tolist(), ys.tolist()):
        top[x], bottom[x] = max(top.get(x, -np.inf), y), min(bottom.get(x, np.inf), y)
    at = np.array(sorted(top))
    upper = np.interp(steps, at, [top[x] for x in at])
    lower = np.interp(steps, at, [bottom[x] for x in at])
    tol = 1e-9 * np.abs(values).max()
    assert (upper >= hi - tol).all() and (lower <= lo + tol).all()
