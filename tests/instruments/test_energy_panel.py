"""The energy panel's total and cumulative line over steps whose energy is NaN with a reason, and the
energy error bound (``error_j``) on the panel. References: the values logged (``Run.series``, ``Run.data``)."""

import math

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")
from picture_checks import draw_panel  # noqa: E402

REASON = "RAPL counter unreadable on this step"


def draw_energy(run):
    ax = draw_panel("energy", run, figsize=(7, 4))
    fig = ax.figure
    texts = " ".join(t.get_text() for a in fig.axes for t in a.texts)
    twin = [a for a in fig.axes if a is not ax][0]
    return ax, twin, texts


def energy_log(path, steps=20, nan_steps=range(5, 15), error_j=math.nan, label="estimated"):
    w = RunLogWriter(path, {})
    for s in range(steps):
        j = 3.0 + 0.5 * s
        rec = {"type": "step", "step": s, "values": {"loss": 1.0, "energy": j, "energy/cpu": j},
               "data": {"energy": {"cpu": {"status": label, "source": "tdp-model", "error_j": error_j},
                                   "total": {"label": label, "devices": ["cpu"], "missing": [], "error_j": error_j},
                                   "steps": 1, "carbon_intensity_g_per_kwh": 400.0}}}
        if s in nan_steps:
            rec["values"].update({"energy": math.nan, "energy/cpu": math.nan})
            rec["reasons"] = {"energy": REASON, "energy/cpu": REASON}
            rec["data"]["energy"]["cpu"] = {"status": "unavailable", "reason": REASON, "error_j": math.nan}
            rec["data"]["energy"]["total"] = {"label": "unavailable", "devices": [], "missing": ["cpu"],
                                              "error_j": math.nan}
        w.write(rec)
    w.close()
    return cockpit_lite.load(path)


def test_total_says_over_how_many_steps_it_sums_and_why_the_others_are_nan(tmp_path):
    run = energy_log(tmp_path)
    _, joules = run.series("energy")
    ok = np.isfinite(joules)
    _, _, text = draw_energy(run)
    flat = " ".join(text.split())  # the box wraps its lines
    assert f"total {joules[ok].sum() / 3.6e3:.3g} Wh" in flat
    assert f"over {ok.sum()} of {len(joules)} steps; {(~ok).sum()} NaN: {REASON}" in flat
    assert set(run.reasons("energy").values()) == {REASON}


def test_cumulative_line_has_gaps_where_energy_is_nan(tmp_path):
    run = energy_log(tmp_path)
    _, joules = run.series("energy")
    ok = np.isfinite(joules)
    _, twin, _ = draw_energy(run)
    [line] = [ln for ln in twin.get_lines() if ln.get_label() == "cumulative"]
    y = np.asarray(line.get_ydata(), dtype=float)
    assert np.isnan(y[~ok]).all()  # not 0 J: unknown
    np.testing.assert_allclose(y[ok], np.cumsum(np.where(ok, joules, 0.0))[ok] / 3.6e6)


def test_measured_total_carries_its_error_bound(tmp_path):
    write_synthetic_log(tmp_path, 30, quantities=["loss", "energy"], energy_status="measured")
    run = cockpit_lite.load(tmp_path)
    bound = sum(float(d["total"]["error_j"]) for _, d in run.data("energy"))
    assert bound > 0
    _, joules = run.series("energy")
    _, _, text = draw_energy(run)
    assert f"total {joules.sum() / 3.6e3:.3g} Wh ± {bound / 3.6e3:.2g} Wh" in " ".join(text.split())


def test_estimate_without_a_bound_says_so(tmp_path):
    run = energy_log(tmp_path, nan_steps=())
    assert all(math.isnan(float(d["total"]["error_j"])) for _, d in run.data("energy"))
    _, _, text = draw_energy(run)
    assert "estimated, no bound" in text and "±" not in text and "NaN:" not in text


def test_finite_bound_per_step_is_summed_over_the_finite_steps_only(tmp_path):
    run = energy_log(tmp_path, nan_steps=(3, 4), error_j=0.25, label="measured")
    _, joules = run.series("energy")
    ok = np.isfinite(joules)
    bound = sum(float(d["total"]["error_j"]) for s, d in run.data("energy") if np.isfinite(joules[s]))
    _, _, text = draw_energy(run)
    flat = " ".join(text.split())
    assert f"± {bound / 3.6e3:.2g} Wh over {ok.sum()} of {len(joules)} steps; 2 NaN: {REASON}" in flat
