"""Line panels say how many of their steps are NaN and why ('k of n steps NaN: <first reason>'), one shared
helper (``instruments/_nan_note.py``) for every panel. References: ``Run.series`` and ``Run.reasons``."""

import math

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter
from helpers import written_run

pytest.importorskip("matplotlib")
from picture_checks import draw_panel  # noqa: E402

STEPS = 30
KEYS = ("alpha", "loss", "mean_gsnr", "early_stopping", "hess_max_ev", "hess_trace", "tic_trace", "tic_diag",
        "inner_test", "ortho_test", "norm_test")
NAN_AT = {key: {(3 * i + k) % STEPS for k in range(2 + i % 3)} for i, key in enumerate(KEYS)}


def reason(key, step):
    return f"{key} not computed: test cause {step % 2}"


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("nan_note")
    rng = np.random.default_rng(0)
    w = RunLogWriter(d, {})
    for s in range(STEPS):
        values, reasons = {}, {}
        for key in KEYS:
            values[key] = float(0.2 + rng.random())
            if s in NAN_AT[key]:
                values[key] = math.nan
                reasons[key] = reason(key, s)
        values["hess_trace/stderr"] = 0.1
        values["tic_trace/stderr"] = 0.01
        w.write({"type": "step", "step": s, "values": values, "reasons": reasons})
    w.close()
    return cockpit_lite.load(d)


def panel_text(name, run):
    ax = draw_panel(name, run)
    return " ".join(" ".join(t.get_text().split()) for t in ax.texts)


def expected(run, key):
    steps, values = run.series(key)
    nan = np.isnan(values)
    first = int(steps[nan][0])
    return f"{key}: {int(nan.sum())} of {len(values)} steps NaN: {run.reasons(key)[first]}"


@pytest.mark.parametrize("name,keys", [
    ("alpha_gauge", ["alpha"]), ("alpha_trace", ["alpha"]), ("performance", ["loss"]), ("gsnr", ["mean_gsnr"]),
    ("early_stopping", ["early_stopping"]), ("hess_max_ev", ["hess_max_ev"]), ("traces", ["hess_trace"]),
    ("tic", ["tic_diag", "tic_trace"]), ("gradient_tests", ["inner_test", "ortho_test"]),
    ("gradient_tests_history", ["norm_test", "inner_test", "ortho_test"]),
])
def test_panel_counts_nan_steps_and_gives_the_first_reason(nan_run, name, keys):
    text = panel_text(name, nan_run)
    for key in keys:
        want = expected(nan_run, key)
        assert 0 < np.isnan(nan_run.series(key)[1]).sum() < STEPS
        assert want in text, (want, text)


def test_note_only_where_values_are_nan(nan_run, tmp_path):
    clean = written_run(tmp_path, [{"loss": 1.0 + s, "mean_gsnr": 0.5} for s in range(10)])
    assert "NaN" not in panel_text("performance", clean) and "NaN" not in panel_text("gsnr", clean)
    assert expected(nan_run, "loss") in panel_text("performance", nan_run)
