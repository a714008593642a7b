"""End to end: the real ``tensorboard`` over a logdir written by real training runs, the Cockpit
tab opened in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

Skips, saying why, only when chromium or playwright is not installed (.ci/tensorboard-deps.sh
installs both). Every wait is bounded; tensorboard is stopped at the end. The screenshot goes to
the test's tmp folder, or to $COCKPIT_SCREENSHOT_DIR when that is set.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import cockpit_lite
from cockpit_lite.tensorboard.writer import TensorBoardSink

from test_tensorboard_routes import structured_records, train_watched

CHROMIUM = os.environ.get("COCKPIT_CHROMIUM", "/usr/bin/chromium")
XSS_RUN = "<img src=x onerror=window.__xss=1>"
WAIT_S = 60


def _need_browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"chromium is not installed at {CHROMIUM} (run .ci/tensorboard-deps.sh)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright for Python is not installed (run .ci/tensorboard-deps.sh)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tensorboard_cmd():
    exe = shutil.which("tensorboard")
    return [exe] if exe else [sys.executable, "-m", "tensorboard.main"]


class TensorBoard:
    """``tensorboard`` on a free 127.0.0.1 port; stopped (and waited for) on exit."""

    def __init__(self, logdir, *flags):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(logdir).parent / f"tensorboard-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            _tensorboard_cmd() + [f"--logdir={logdir}", "--host=127.0.0.1", f"--port={self.port}",
                                  "--reload_interval=1", "--samples_per_plugin=cockpit_lite=0", *flags],
            stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path, timeout=10):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def wait_for(self, path, ok, what):
        deadline = time.monotonic() + WAIT_S
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                last = self.get(path)
                if ok(last):
                    return last
            except (urllib.error.URLError, ConnectionError, OSError, ValueError) as err:
                last = err
            time.sleep(0.5)
        self.log.seek(0)
        raise AssertionError(f"tensorboard never showed {what} (last answer: {last!r}); its log:\n{self.log.read()[-3000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.log.close()


def _runs_ready(names):
    return lambda body: {r["run"] for r in body.get("runs", [])} >= set(names)


@pytest.fixture(scope="module")
def logroot(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb_e2e")
    run = train_watched(root / "sgd_run", steps=8)
    train_watched(root / XSS_RUN, steps=3, quantities="default", seed=1)
    sink = TensorBoardSink(root / "structured")
    for r in structured_records():
        sink.write(r)
    sink.close()
    return root, run


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_tensorboard_serves_the_run_log_through_both_data_paths(logroot, load_fast):
    """The Rust data server (--load_fast=true) and the Python loader (false) give the same panels."""
    root, run = logroot
    with TensorBoard(root, f"--load_fast={load_fast}") as tb:
        tb.wait_for("/data/plugin/cockpit_lite/runs", _runs_ready(["sgd_run", "structured", XSS_RUN]), "the three runs")
        listing = tb.get("/data/plugins_listing")
        assert listing["cockpit_lite"]["enabled"] is True and listing["cockpit_lite"]["tab_name"] == "Cockpit"
        body = tb.get("/data/plugin/cockpit_lite/run?run=sgd_run")
        for key in ("loss", "grad_norm"):
            steps, values = run.series(key)
            assert body["scalars"][key]["steps"] == steps.tolist()
            np.testing.assert_allclose(body["scalars"][key]["values"], values.astype(np.float32), rtol=1e-6)
        structured = tb.get("/data/plugin/cockpit_lite/run?run=structured")
        assert structured["data"]["grad_hist_1d"]["step"] == 4
        assert structured["scalars"]["alpha"]["steps"] == [0, 1, 2, 3]
        assert structured["reasons"]["alpha"] == [{"step": 2, "reasons": {"alpha": "the update was zero"}}]
        # the stock scalars dashboard sees the cockpit's scalars
        tags = tb.get("/data/plugin/scalars/tags")
        assert "cockpit/loss" in tags["sgd_run"]
        # the real server, raw paths (not normalized by a client): no way out of static/
        import http.client

        for bad in ["../plugin.py", "..%2Fplugin.py", "..%5Cplugin.py", "%2e%2e%2fplugin.py", "..\\plugin.py",
                    "%2F%2Fetc%2Fpasswd", "../../../../../../etc/passwd"]:
            conn = http.client.HTTPConnection("127.0.0.1", tb.port, timeout=10)
            conn.request("GET", "/data/plugin/cockpit_lite/static/" + bad)
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            assert resp.status in (400, 404), (bad, resp.status)
            assert b"import" not in body and b"root:" not in body, bad


def test_cockpit_tab_in_headless_chromium(logroot, tmp_path):
    _need_browser()
    from playwright.sync_api import sync_playwright

    root, run = logroot
    shots = Path(os.environ.get("COCKPIT_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    # a run that is still growing: watched, flushed, and trained further while the tab is open
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    live_sink = TensorBoardSink(root / "live", flush_secs=0.2)
    cockpit = cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=root / "live", quantities="default",
                                 sinks=[live_sink])

    def train(n):
        for _ in range(n):
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        live_sink.flush()

    train(3)
    errors, dialogs = [], []
    try:
        with TensorBoard(root, "--load_fast=true") as tb, sync_playwright() as pw:
            tb.wait_for("/data/plugin/cockpit_lite/runs", _runs_ready(["sgd_run", "structured", "live", XSS_RUN]), "the runs")
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1900})
                page.set_default_timeout(WAIT_S * 1000)
                page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text} @ {m.location}") if m.type == "error" else None)
                page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.goto(f"{tb.url}/#cockpit_lite", wait_until="load")
                page.wait_for_selector("iframe", state="attached")
                frame = _plugin_frame(page)
                frame.wait_for_selector("body[data-ready='true']")

                # the run list: names rendered as text, the XSS name inert
                options = frame.eval_on_selector_all("select[aria-label='run'] option", "os => os.map(o => o.textContent)")
                assert options == sorted(["sgd_run", "structured", "live", XSS_RUN])
                assert frame.evaluate("document.querySelectorAll('img').length") == 0
                assert frame.evaluate("window.__xss === undefined") and page.evaluate("window.__xss === undefined")

                # the real SGD run: loss and gradient norm drawn with one point per step
                _show(frame, "sgd_run")
                frame.wait_for_selector("section[data-panel='loss'][data-state='data'] path[data-series='loss']")
                points = int(frame.get_attribute("section[data-panel='loss'] path[data-series='loss']", "data-points"))
                assert points == len(run.series("loss")[0]) == 8
                assert frame.get_attribute("section[data-panel='grad-norm'] path[data-series='grad_norm']", "data-points") == "8"
                for quiet in ("histograms", "energy"):  # not logged by this run: the panel says so
                    if not run.data("grad_hist_1d") and quiet == "histograms" or quiet == "energy" and not run.data("energy"):
                        assert frame.get_attribute(f"section[data-panel='{quiet}']", "data-state") == "empty"
                        assert "No data" in frame.inner_text(f"section[data-panel='{quiet}'] .empty")
                page.screenshot(path=str(shots / "cockpit_tab_sgd_run.png"), full_page=True)

                # the structured run: alpha distribution, histograms, curvature, energy provenance, reasons
                _show(frame, "structured")
                frame.wait_for_selector("section[data-panel='histograms'][data-state='data'] canvas")
                assert frame.eval_on_selector_all("section[data-panel='histograms'] rect[data-count]", "rs => rs.length") > 50
                assert frame.get_attribute("section[data-panel='alpha']", "data-state") == "data"
                assert "median α" in frame.inner_text("section[data-panel='alpha']")
                assert frame.get_attribute("section[data-panel='energy'] .badge", "data-status") == "estimated"
                assert "TDP model" in frame.inner_text("section[data-panel='energy']")
                curvature = frame.inner_text("section[data-panel='curvature']")
                assert "converged after 12 Hessian-vector products" in curvature
                assert frame.get_attribute("section[data-panel='gradient-tests'] path[data-series='norm_test']", "data-points") == "5"
                problems = frame.inner_text("section[data-panel='problems']")
                assert "the update was zero" in problems and "GradScaler found inf gradients" in problems
                assert "The learning rate is too large" in frame.inner_text("section[data-panel='advisor']")
                page.screenshot(path=str(shots / "cockpit_tab_structured.png"), full_page=True)

                # the live run grows: the tab polls and redraws without a reload
                _show(frame, "live")
                frame.wait_for_selector("section[data-panel='loss'] path[data-series='loss'][data-points='3']")
                train(4)
                frame.wait_for_selector("section[data-panel='loss'] path[data-series='loss'][data-points='7']",
                                        timeout=WAIT_S * 1000)

                # the XSS-named run opens like any other, its name shown as text
                _show(frame, XSS_RUN)
                frame.wait_for_selector("section[data-panel='loss'] path[data-series='loss'][data-points='3']")
                assert frame.evaluate("document.querySelectorAll('img').length") == 0
                page.screenshot(path=str(shots / "cockpit_tab_xss_run.png"), full_page=False)
            finally:
                browser.close()
    finally:
        cockpit.close()
    assert not dialogs, f"a dialog opened: {dialogs}"
    assert not errors, "console errors:\n" + "\n".join(errors)


def _show(frame, run):
    """Choose ``run`` in the tab's run list and wait until its panels are drawn."""
    frame.select_option("select[aria-label='run']", run)
    frame.wait_for_function("name => document.querySelector('.grid').dataset.run === name", arg=run)


def _plugin_frame(page):
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        for frame in page.frames:
            if "plugin_entry.html" in frame.url and "cockpit_lite" in frame.url:
                return frame
        page.wait_for_timeout(200)
    raise AssertionError(f"no cockpit_lite iframe; frames: {[f.url for f in page.frames]}")
