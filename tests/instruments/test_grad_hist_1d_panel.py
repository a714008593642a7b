"""The gradient element histogram when the latest step logged the documented 'no histogram' structure
``{"edges": null, "counts": null, "reason": ...}`` (docs/record-keys.md): the panel says the reason and
draws the last valid histogram, labelled with its step. References: ``Run.data("grad_hist_1d")``."""

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.instruments import RunView, builtin
from cockpit_lite.runlog import RunLogWriter

pytest.importorskip("matplotlib")
from matplotlib.patches import StepPatch  # noqa: E402
from picture_checks import draw_panel  # noqa: E402

REASON = "no parameter has per-sample information: 0.weight has no factored form"


def hist_log(path, valid_steps, unavailable_steps):
    rng = np.random.default_rng(1)
    w = RunLogWriter(path, {})
    for s in range(max(list(valid_steps) + list(unavailable_steps)) + 1):
        rec = {"type": "step", "step": s, "values": {"loss": 1.0}}
        if s in valid_steps:
            rec["data"] = {"grad_hist_1d": {"edges": np.linspace(-1, 1, 11).tolist(),
                                            "counts": rng.integers(1, 40, 10).tolist(), "scale": "B*g_ij"}}
        elif s in unavailable_steps:
            rec["data"] = {"grad_hist_1d": {"edges": None, "counts": None, "scale": "B*g_ij", "reason": REASON}}
        w.write(rec)
    w.close()
    return cockpit_lite.load(path)


def draw(run):
    [inst] = [i for i in builtin() if i.name == "grad_hist_1d"]
    assert inst.missing(RunView(run)) is None
    return draw_panel(inst, run)


def test_unavailable_last_histogram_shows_its_reason_and_the_last_valid_one(tmp_path):
    run = hist_log(tmp_path, valid_steps=(0, 5), unavailable_steps=(9,))
    logged = dict(run.data("grad_hist_1d"))
    assert logged[9]["edges"] is None and logged[9]["reason"] == REASON
    ax = draw(run)
    text = " ".join(" ".join(t.get_text().split()) for t in ax.texts)
    assert "step 9" in text and REASON in text
    patches = {p.get_label(): p for p in ax.patches if isinstance(p, StepPatch)}
    assert set(patches) == {"step 0", "step 5 (last valid)"}
    values, edges, _ = patches["step 5 (last valid)"].get_data()
    np.testing.assert_array_equal(values, logged[5]["counts"])
    np.testing.assert_allclose(edges, logged[5]["edges"])


def test_no_valid_histogram_at_all_shows_the_reason(tmp_path):
    run = hist_log(tmp_path, valid_steps=(), unavailable_steps=(2, 4))
    ax = draw(run)
    text = " ".join(" ".join(t.get_text().split()) for t in ax.texts)
    assert "step 4" in text and REASON in text
    assert not [p for p in ax.patches if isinstance(p, StepPatch)]
