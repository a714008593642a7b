"""The Cockpit tab's energy and histogram panels (``static/index.js``) in headless Chromium, fed with the JSON
the plugin serves (built here from the records' documented shapes, docs/record-keys.md; fetch answered by
Playwright, no TensorBoard server), and the plugin's ``last_valid`` histogram, read through TensorBoard's
Python loader. Skips, saying why, when chromium or playwright is not installed (.ci/tensorboard-deps.sh)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorboard")

from cockpit_lite.instruments import tab_panels  # noqa: E402
from cockpit_lite.runlog import _clean  # noqa: E402
from cockpit_lite.tensorboard.writer import TensorBoardSink  # noqa: E402

from test_tensorboard_e2e import CHROMIUM, _need_browser  # noqa: E402
from test_tensorboard_routes import BASE, get_json, make_client  # noqa: E402

INDEX_JS = Path(__file__).resolve().parents[2] / "cockpit_lite" / "tensorboard" / "static" / "index.js"
REASON = "no parameter has per-sample information: 0.weight has no factored form"
EDGES = np.linspace(-1, 1, 11).tolist()
COUNTS = [3, 0, 5, 9, 12, 7, 4, 1, 0, 2]


def energy_doc(total_label, total_error, cpu_error):
    return {"gpu0": {"status": "measured", "source": "nvml", "error_j": 0.1,
                     "window": {"window": [3, 5], "window_j": 30.0, "window_error_j": 0.3, "target_met": True}},
            "cpu": {"status": "estimated", "source": "tdp-model", "error_j": cpu_error, "reason": "RAPL is not readable"},
            "total": {"label": total_label, "devices": ["gpu0", "cpu"], "missing": [], "error_j": total_error},
            "steps": 1, "carbon_intensity_g_per_kwh": 400.0, "carbon_source": "world average", "pue": 1.0}


def run_body(energy, hist):
    return _clean({"run": "r", "scalars": {"energy": {"steps": [0, 1, 2, 3, 4, 5], "values": [10.0] * 6}},
                   "data": {"energy": {"step": 5, "value": energy, "steps": 6}, "grad_hist_1d": hist},
                   "reasons": {}, "flags": [], "events": [], "reason_counts": {}, "reason_counts_partial": [],
                   "overflow": []})


def render_tab(body, panel=None):
    """The tab drawn from ``body`` (the /run answer); returns the energy badges {device: (status, text)}, the
    histogram panel's text, bar counts and state; with ``panel``, that panel's text only."""
    _need_browser()
    from playwright.sync_api import sync_playwright

    routes = {"panels": {"panels": tab_panels()}, "run": body,
              "runs": {"runs": [{"run": "r", "max_step": 5, "max_wall_time": 1.0}]}}

    def handle(route, request):
        path = request.url.split("/tab/", 1)[1].split("?")[0]
        if path == "index.html":
            route.fulfill(body="<html><head></head><body><script type=module>import {render} from './index.js';"
                               " render();</script></body></html>", content_type="text/html")
        elif path == "index.js":
            route.fulfill(path=str(INDEX_JS), content_type="text/javascript")
        else:
            route.fulfill(body=json.dumps(routes[path]), content_type="application/json")

    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.set_default_timeout(30_000)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("http://cockpit.test/tab/**", handle)
            page.goto("http://cockpit.test/tab/index.html")
            page.wait_for_selector("body[data-ready=true]")
            if panel is not None:
                text = page.inner_text(f"section[data-panel='{panel}']")
                assert not errors, errors
                return " ".join(text.split())
            badges = page.eval_on_selector_all(
                "section[data-panel='energy'] .badge",
                "bs => bs.map(b => [b.dataset.device, b.dataset.status, b.textContent])")
            hist = page.inner_text("section[data-panel='histograms']")
            bars = page.eval_on_selector_all("section[data-panel='histograms'] rect[data-count]",
                                             "rs => rs.map(r => Number(r.dataset.count))")
            hist_state = page.get_attribute("section[data-panel='histograms']", "data-state")
        finally:
            browser.close()
    assert not errors, errors
    return {d: (s, t) for d, s, t in badges}, " ".join(hist.split()), bars, hist_state


def test_energy_total_badge_reads_the_total_label_and_every_error_bound():
    badges, *_ = render_tab(run_body(energy_doc("measured", 0.5, 0.2), None))
    status, text = badges["total"]
    assert status == "measured" and text.startswith("total: measured ± 0.5 J"), badges
    assert "unknown" not in text
    assert badges["gpu0"][0] == "measured" and "gpu0: measured ± 0.1 J" in badges["gpu0"][1]
    assert "window 3–5: 30 ± 0.3 J" in badges["gpu0"][1]
    assert badges["cpu"][0] == "estimated" and "cpu: estimated ± 0.2 J" in badges["cpu"][1]


def test_energy_estimate_without_a_bound_says_so():
    badges, *_ = render_tab(run_body(energy_doc("estimated", math.nan, math.nan), None))
    assert badges["total"][0] == "estimated" and "estimated, no bound" in badges["total"][1]
    assert "estimated, no bound" in badges["cpu"][1] and "±" not in badges["cpu"][1]


def test_histogram_panel_shows_the_logged_reason_and_the_last_valid_histogram():
    hist = {"step": 9, "steps": 3, "value": {"edges": None, "counts": None, "scale": "B*g_ij", "reason": REASON},
            "last_valid": {"step": 6, "value": {"edges": EDGES, "counts": COUNTS, "scale": "B*g_ij"}}}
    _, text, bars, state = render_tab(run_body(energy_doc("measured", 0.5, 0.2), hist))
    assert state == "data"
    assert f"grad_hist_1d at step 9: no histogram ({REASON})" in text
    assert "step 6 (last valid)" in text and "did not log" not in text
    assert bars == [c for c in COUNTS if c > 0]


def test_plugin_sends_the_last_valid_histogram_after_an_unavailable_one(tmp_path):
    sink = TensorBoardSink(tmp_path / "r")
    logged = {}
    for step in range(4):
        if step < 3:
            doc = {"edges": EDGES, "counts": [c + step for c in COUNTS], "scale": "B*g_ij"}
        else:
            doc = {"edges": None, "counts": None, "scale": "B*g_ij", "reason": REASON}
        logged[step] = doc
        sink.write({"type": "step", "step": step, "values": {"loss": 1.0}, "data": {"grad_hist_1d": doc}})
    sink.close()
    client, _ = make_client(tmp_path)
    h1 = get_json(client, f"{BASE}/run?run=r")["data"]["grad_hist_1d"]
    assert h1["step"] == 3 and h1["value"]["reason"] == REASON
    assert h1["last_valid"] == {"step": 2, "value": _clean(logged[2])}


def test_alpha_panel_states_the_error_of_one_step_and_of_the_observations():
    """alpha/stderr (median over the steps) in the legend; the fit's observed losses with the standard errors of
    the batch means, sqrt(var / n), from the logged variances."""
    fit = {"t": 0.5, "f0": 2.0, "f1": 1.7, "df0": -1.0, "df1": -0.2, "var_f0": 0.5, "var_f1": 0.32,
           "var_df0": 2.0, "var_df1": 1.5, "w": [2.0, -1.0, 0.4], "case": "fit", "n0": 128, "n1": 32}
    body = run_body(energy_doc("measured", 0.5, 0.2), None)
    body["scalars"]["alpha"] = {"steps": [0, 1, 2], "values": [-0.2, 0.1, 0.3]}
    body["scalars"]["alpha/stderr"] = {"steps": [0, 1, 2], "values": [0.05, 0.2, 0.1]}
    body["data"]["alpha"] = {"step": 2, "value": fit, "steps": 3}
    text = render_tab(body, panel="alpha")
    assert "one step's α ± 0.1 (1 s.e., median over 3 steps)" in text, text
    assert "f(0) = 2 ± 0.0625" in text and "f(t) = 1.7 ± 0.1" in text, text
