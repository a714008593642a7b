"""Curvature estimates are shown with their error: the panels shade value +- error where the recorded error
is > 0 (an estimate) and draw no band for exact values (error 0)."""

from __future__ import annotations

import numpy as np
import pytest

import cockpit_lite

pytest.importorskip("matplotlib")
from matplotlib.collections import PolyCollection  # noqa: E402
from picture_checks import draw_panel  # noqa: E402


def _write(path, records):
    from cockpit_lite.runlog import RunLogWriter

    w = RunLogWriter(path, {"optimizer": "SGD", "optimizer_defaults": {"momentum": 0.0},
                            "params": [{"name": "0.weight", "shape": [4, 4], "numel": 16}]})
    for r in records:
        w.write({"type": "step", "samples": 32, **r})
    w.close({"steps": len(records)})
    return cockpit_lite.load(path)


def _records(n, *, tic_se, ev_bound, converged=True, ev=1.0, lr=0.1):
    out = []
    for s in range(n):
        out.append({"step": s, "values": {
            "tic_diag": 2.0 + s, "tic_diag/stderr": 0.0, "tic_trace": 1.0 + 0.1 * s, "tic_trace/stderr": tic_se,
            "hess_max_ev": ev + s, "hess_max_ev/error_bound": ev_bound, "hess_max_ev/hvps": 10, "lr": lr,
            "loss": 1.0},
            "data": {"hess_max_ev": {"converged": converged, "hvps": 10, "method": "lanczos", "residual": 0.0},
                     "tic_trace": {"curvature": "estimate:hutchinson-diag-hessian", "probes": 30}}})
    return out


def _draw(name, run):
    return draw_panel(name, run, figsize=(5, 4))


def _bands(ax):
    """Shaded bands (dense series) and error bars (sparse series): the error drawn with the estimate."""
    return [c for c in ax.collections if isinstance(c, PolyCollection)] + list(ax.containers)


def test_tic_trace_estimate_has_a_band_of_its_standard_error(tmp_path):
    run = _write(tmp_path / "a", _records(6, tic_se=0.2, ev_bound=0.0))
    bands = _bands(_draw("tic", run))
    assert len(bands) == 1 and "standard error" in bands[0].get_label()
    if hasattr(bands[0], "get_paths"):
        ys = np.concatenate([p.vertices[:, 1] for p in bands[0].get_paths()])
    else:  # error bars of a sparse series
        ys = np.concatenate([seg[:, 1] for seg in bands[0].lines[2][0].get_segments()])
    assert ys.min() == pytest.approx(1.0 - 0.2) and ys.max() == pytest.approx(1.5 + 0.2)
    assert not _bands(_draw("tic", _write(tmp_path / "b", _records(6, tic_se=0.0, ev_bound=0.0))))


def test_hess_max_ev_shows_its_residual_bound(tmp_path):
    run = _write(tmp_path / "a", _records(5, tic_se=0.0, ev_bound=0.5))
    bands = _bands(_draw("hess_max_ev", run))
    assert len(bands) == 1 and "residual bound" in bands[0].get_label()
    assert not _bands(_draw("hess_max_ev", _write(tmp_path / "b", _records(5, tic_se=0.0, ev_bound=0.0))))


def test_advisor_reads_unconverged_top_eigenvalues_as_lower_bounds(tmp_path):
    """A Lanczos Ritz value never exceeds the top eigenvalue, so an unconverged value above the stability
    edge 2/lr is evidence too; one below it is not."""
    from cockpit_lite.advisor.rules import Thresholds, lr_too_large

    for converged in (True, False):
        run = _write(tmp_path / f"hi{converged}", _records(6, tic_se=0, ev_bound=0.01, converged=converged,
                                                           ev=100.0, lr=0.1))
        assert lr_too_large(run, Thresholds())
    low = _write(tmp_path / "lo", _records(6, tic_se=0, ev_bound=0.01, converged=False, ev=1.0, lr=0.1))
    assert lr_too_large(low, Thresholds()) is None
