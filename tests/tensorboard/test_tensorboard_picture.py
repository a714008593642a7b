"""The Cockpit tab checked as a picture in headless Chromium, on the awkward run (cockpit_lite/testing/awkward_log.py)
and a second run to overlay: what a person reads (text boxes that do not overlap and stay on the page,
counts labelled as counts, NaN counts that match the log, a finite 2e299 flagged, an advisor that was on,
no stale panels after a failed load, two runs on one chart)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cockpit_lite.testing import write_awkward_log
from test_tensorboard_e2e import CHROMIUM, WAIT_S, TensorBoard, _need_browser, _plugin_frame, _runs_ready, _show

pytestmark = [pytest.mark.slow, pytest.mark.integration]

OVERLAPS_JS = """() => {
  const found = [];
  const inside = [];
  const width = document.documentElement.clientWidth;
  for (const svg of document.querySelectorAll('section svg')) {
    const boxes = [...svg.querySelectorAll('text')].filter((t) => t.textContent.trim()).map((t) => [t.textContent, t.getBoundingClientRect()]);
    for (let i = 0; i < boxes.length; i++) for (let j = i + 1; j < boxes.length; j++) {
      const [a, ra] = boxes[i], [b, rb] = boxes[j];
      const dx = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
      const dy = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
      if (dx > 1 && dy > 1) found.push([svg.closest('section').dataset.panel, a, b]);
    }
  }
  for (const node of document.querySelectorAll('section h2, section .sub, section .legend span, section svg text')) {
    const r = node.getBoundingClientRect();
    const box = node.closest('section').getBoundingClientRect();
    if (r.width && (r.left < box.left - 1 || r.right > box.right + 1 || r.right > width + 1)) inside.push(node.textContent);
  }
  return {found, inside};
}"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_picture")
    write_awkward_log(root / "awkward", 300, tensorboard=True)
    write_awkward_log(root / "second", 300, seed=1, tensorboard=True)
    return root


def test_the_tab_reads_right(root, tmp_path, monkeypatch):
    _need_browser()
    # tensorboard imports the plugin from this checkout (not from wherever the package is installed)
    here = str(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("PYTHONPATH", here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    from playwright.sync_api import sync_playwright

    with TensorBoard(root, "--load_fast=true") as tb, sync_playwright() as pw:
        tb.wait_for("/data/plugin/cockpit_lite/runs", _runs_ready(["awkward", "second"]), "the runs")
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{tb.url}/#cockpit_lite", timeout=WAIT_S * 1000)
            frame = _plugin_frame(page)
            frame.wait_for_selector("body[data-ready='true']", timeout=WAIT_S * 1000)
            _show(frame, "awkward")
            frame.wait_for_selector("section[data-panel='histograms'][data-state='data']")

            # the advisor was on: the panel does not ask for advisor=True
            advisor = frame.inner_text("section[data-panel='advisor']")
            assert "advisor=True) and has made no diagnosis" in advisor and "runs live with" not in advisor
            # log10 histogram counts labelled as counts
            assert frame.eval_on_selector("section[data-panel='histograms'] svg text.ylabel", "t => t.textContent") == "y: count (log scale)"
            ticks = frame.eval_on_selector_all("section[data-panel='histograms'] svg text.ytick", "ts => ts.map(t => t.textContent)")
            assert ticks[:3] == ["1", "10", "100"]
            # NaN counts: 92 steps of the gradient tests had no value (more than the 50 reason rows sent)
            problems = frame.inner_text("section[data-panel='problems']")
            assert "(92 steps not computed)" in problems
            # the finite 2e299 loss: flagged, not an unexplained inf
            assert "2e+299: finite, beyond float32" in problems
            assert "beyond float32" in frame.inner_text("section[data-panel='loss']")
            # alpha: robust statistics and the off-axis count
            alpha = frame.inner_text("section[data-panel='alpha']")
            assert "median α" in alpha and "1 below -1.5 and 2 above +1.5" in alpha
            # a constant series has distinct tick labels (no "1 1 1 1")
            for panel in ("lr", "gsnr"):
                labels = frame.eval_on_selector_all(f"section[data-panel='{panel}'] svg text.ytick", "ts => ts.map(t => t.textContent)")
                assert labels and len(labels) == len(set(labels)), (panel, labels)
            measured = frame.evaluate(OVERLAPS_JS)
            assert measured["found"] == [] and measured["inside"] == []
            shots = Path(os.environ.get("COCKPIT_SCREENSHOT_DIR") or tmp_path)
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "tensorboard_tab.png"), full_page=True)

            # overlay: the second run on the same charts, dashed and named
            frame.select_option("select[aria-label='overlay run']", "second")
            frame.wait_for_selector("section[data-panel='loss'] path[data-series='second: loss']")
            assert frame.get_attribute("section[data-panel='loss'] path[data-series='second: loss']", "stroke-dasharray") == "5 3"

            # a run that fails to load: its name over no stale panels of the previous run
            frame.select_option("select[aria-label='overlay run']", "")
            page.route("**/run?run=second*", lambda route: route.fulfill(status=500, body="boom"))
            frame.select_option("select[aria-label='run']", "second")
            frame.wait_for_selector(".grid p[data-error='true']", timeout=WAIT_S * 1000)
            assert frame.evaluate("document.querySelector('.grid').dataset.run") == ""
            assert frame.eval_on_selector_all("section[data-panel]", "s => s.length") == 0
        finally:
            browser.close()
