"""The TensorBoard sink and plugin, through werkzeug's test client.

The event files are written by real watched training runs (and, for the structured panels whose
quantities a tiny run may not log, by the sink fed with run-log records of the documented shapes).
TensorBoard reads them with its own Python loader (``--load_fast=false``'s data provider); the Rust
data server is exercised by the end-to-end test. The reference for every number is the run log
(``cockpit.jsonl``) read by ``cockpit_lite.load``, not the sink.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
import torch

tb = pytest.importorskip("tensorboard")

from tensorboard.backend import application  # noqa: E402
from tensorboard.backend.event_processing import data_provider as mdp  # noqa: E402
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem  # noqa: E402
from tensorboard.plugins import base_plugin  # noqa: E402
from werkzeug.test import Client  # noqa: E402

from helpers import watched_training  # noqa: E402
from cockpit_lite.runlog import _clean  # noqa: E402
from cockpit_lite.tensorboard.loader import CockpitLoader  # noqa: E402
from cockpit_lite.tensorboard.plugin import panel_key, safe_static_name  # noqa: E402
from cockpit_lite.tensorboard.writer import TensorBoardSink  # noqa: E402

BASE = "/data/plugin/cockpit_lite"


def train_watched(logdir, steps=6, quantities="full", seed=0):
    """A real training loop (tiny MLP, SGD with momentum) watched with ``tensorboard=True``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    batches = [(x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]) for i in range(steps)]
    return watched_training(model, opt, loss_fn, batches, logdir, quantities=quantities, tensorboard=True).run


def structured_records():
    """Run-log records of the documented shapes (docs/record-keys.md), in the engine's order:
    the amendment completing step t is handed over right before step t+1's record."""
    rng = np.random.default_rng(0)
    edges = np.linspace(-1, 1, 101)
    counts = rng.integers(0, 50, size=100)
    h2 = rng.integers(0, 9, size=(20, 10))
    recs = []
    for t in range(5):
        if t > 0:
            recs.append({"type": "step", "step": t - 1, "amends": True, "wall": 100.0 + t,
                         "values": {"alpha": -0.4 + 0.2 * t} if t != 3 else {"alpha": math.nan},
                         **({"reasons": {"alpha": "the update was zero"}} if t == 3 else {}),
                         "data": {"alpha": {"t": 0.5, "f0": 1.0, "f1": 0.8, "df0": -1.0, "df1": 0.2,
                                            "var_f0": 0.1, "var_f1": 0.1, "var_df0": 0.1, "var_df1": 0.1,
                                            "w": [1.0, -1.0, 0.9]}}})
        recs.append({"type": "step", "step": t, "wall": 100.0 + t,
                     "values": {"loss": 1.0 / (t + 1), "hess_max_ev": 3.0 + t, "hess_max_ev/hvps": 12.0,
                                "hess_trace": 10.0 - t, "hess_trace/stderr": 0.5, "energy": 2.5,
                                "energy/co2_g": 0.01, "norm_test": 0.5 + t, "tic_diag": math.nan,
                                "grad_norm/0.weight": 0.25},
                     "reasons": {"tic_diag": "needs per-sample gradients of a supported layer"},
                     "data": {"grad_hist_1d": {"edges": edges.tolist(), "counts": (counts + t).tolist(), "scale": "B*g_ij"},
                              "grad_hist_2d": {"x_edges": np.linspace(-1, 1, 21).tolist(),
                                               "y_edges": np.linspace(-2, 2, 11).tolist(),
                                               "counts": h2.tolist(), "x": "B*g_ij", "y": "theta_j"},
                              "hess_max_ev": {"converged": True, "hvps": 12, "method": "lanczos",
                                              "residual": 1e-5, "subbatch": None},
                              "energy": {"cpu": {"status": "estimated", "source": "TDP model", "error_j": 1.0},
                                         "carbon_intensity_g_per_kwh": 400.0}},
                     **({"flags": ["nonfinite_loss"]} if t == 2 else {})})
    recs.append({"type": "skipped", "step": 5, "reason": "GradScaler found inf gradients", "wall": 106.0})
    recs.append({"type": "event", "level": "warning", "message": "quantity 'x' failed to close", "wall": 107.0})
    recs.append({"type": "event", "step": 3, "level": "diagnosis", "wall": 107.5,
                 "message": "[lr_too_large] The learning rate is too large (confidence 0.70): Lower the learning rate",
                 "diagnosis": {"rule": "lr_too_large", "confidence": 0.7, "step": 3}})
    return recs


def make_client(root):
    """The TensorBoard WSGI app over ``root``, read by TensorBoard's Python loader."""
    multiplexer = pem.EventMultiplexer(purge_orphaned_data=True)
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    provider = mdp.MultiplexerDataProvider(multiplexer, str(root))
    context = base_plugin.TBContext(logdir=str(root), data_provider=provider, multiplexer=multiplexer,
                                    flags=None)
    plugin = CockpitLoader().load(context)
    app = application.TensorBoardWSGI([plugin], data_provider=provider)
    return Client(app), plugin


def get_json(client, url):
    resp = client.get(url)
    assert resp.status_code == 200, (url, resp.status_code, resp.get_data(as_text=True)[:300])
    return json.loads(resp.get_data(as_text=True))


def assert_same_series(tb_series, steps, values):
    assert tb_series["steps"] == [int(s) for s in steps]
    got = np.array([float(v) if not isinstance(v, str) else float(v.replace("Infinity", "inf")) for v in tb_series["values"]])
    np.testing.assert_array_equal(np.isnan(got), np.isnan(values))
    ok = ~np.isnan(values)
    np.testing.assert_allclose(got[ok], values[ok].astype(np.float32), rtol=1e-6)


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    run = train_watched(root / "sgd_run", steps=6)
    sink = TensorBoardSink(root / "structured")
    for r in structured_records():
        sink.write(r)
    sink.close()
    return root, run


def test_every_scalar_of_a_real_run_reaches_tensorboard_scalars(real_root):
    root, run = real_root
    client, _ = make_client(root)
    body = get_json(client, f"{BASE}/run?run=sgd_run")
    keys = run.keys()
    assert {"loss", "grad_norm"} <= set(keys)
    panel_keys = [k for k in keys if panel_key(k)]
    assert set(body["scalars"]) == set(panel_keys)
    for key in panel_keys:
        steps, values = run.series(key)
        assert_same_series(body["scalars"][key], steps, values)
    # every key, per-parameter ones included, is a stock scalar tag cockpit/<key>
    scalars = get_json(client, "/data/plugins_listing")
    assert scalars["cockpit_lite"]["enabled"] is True
    assert scalars["cockpit_lite"]["loading_mechanism"] == {"type": "IFRAME", "module_path": f"{BASE}/static/index.js"}
    multiplexer = pem.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(root))
    multiplexer.Reload()
    tags = multiplexer.PluginRunToTagToContent("scalars")["sgd_run"]
    assert set(tags) == {f"cockpit/{k}" for k in keys}
    # the real run's structured data (whatever its quantities wrote) round-trips exactly
    for key in {k for r in run.records for k in r.get("data", {})}:
        step, last = run.data(key)[-1]
        assert body["data"][key]["step"] == step
        assert body["data"][key]["value"] == _clean(last)


def test_structured_panels_amendments_reasons_flags_and_events(real_root):
    root, _ = real_root
    client, _ = make_client(root)
    runs = get_json(client, f"{BASE}/runs")["runs"]
    assert [r["run"] for r in runs] == ["sgd_run", "structured"]
    assert runs[1]["max_step"] == 4
    body = get_json(client, f"{BASE}/run?run=structured")
    # alpha arrives as amendments, one step late, and lands on its own step
    assert body["scalars"]["alpha"]["steps"] == [0, 1, 2, 3]
    assert body["scalars"]["alpha"]["values"][:2] == pytest.approx([-0.2, 0.0], abs=1e-6)
    assert body["scalars"]["alpha"]["values"][2] == "NaN"
    assert body["data"]["alpha"]["step"] == 3 and body["data"]["alpha"]["value"]["w"] == [1.0, -1.0, 0.9]
    # per-parameter keys stay out of the panels; named parts stay in
    assert "grad_norm/0.weight" not in body["scalars"]
    assert {"hess_trace/stderr", "hess_max_ev/hvps", "energy/co2_g"} <= set(body["scalars"])
    h1 = body["data"]["grad_hist_1d"]
    assert h1["step"] == 4 and len(h1["value"]["edges"]) == 101 and sum(h1["value"]["counts"]) > 0
    assert np.array(body["data"]["grad_hist_2d"]["value"]["counts"]).shape == (20, 10)
    assert body["data"]["energy"]["value"]["cpu"]["status"] == "estimated"
    assert body["data"]["hess_max_ev"]["value"]["converged"] is True
    # the NaN reasons, merged per step: step 2 has the record's and the amendment's reason
    assert body["reasons"]["tic_diag"][-1] == {"step": 4, "reasons": {"tic_diag": "needs per-sample gradients of a supported layer"}}
    assert body["reasons"]["alpha"] == [{"step": 2, "reasons": {"alpha": "the update was zero"}}]
    assert body["flags"] == [{"step": 2, "flags": ["nonfinite_loss"]}]
    assert [e["type"] for e in body["events"]] == ["skipped", "event", "event"]
    assert body["events"][-1]["level"] == "diagnosis" and body["events"][-1]["diagnosis"]["rule"] == "lr_too_large"
    assert body["events"][0]["reason"] == "GradScaler found inf gradients"


def test_same_step_documents_are_merged_not_lost(tmp_path):
    sink = TensorBoardSink(tmp_path / "r")
    sink.write({"type": "step", "step": 0, "values": {"a": math.nan}, "reasons": {"a": "first"}, "flags": ["x"]})
    sink.write({"type": "step", "step": 0, "amends": True, "values": {"a/part": math.nan},
                "reasons": {"a/part": "second"}, "flags": ["y"]})
    sink.write({"type": "step", "step": 1, "values": {"a": 1.0}})
    sink.close()
    client, _ = make_client(tmp_path)
    body = get_json(client, f"{BASE}/run?run=r")
    assert body["reasons"]["a"] == [{"step": 0, "reasons": {"a": "first", "a/part": "second"}}]
    assert body["flags"] == [{"step": 0, "flags": ["x", "y"]}]
    assert body["scalars"]["a"] == {"steps": [0, 1], "values": ["NaN", 1.0]}


def test_plugin_is_inactive_and_cheap_without_cockpit_data(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(tmp_path / "plain") as w:  # a run of someone else's scalars only
        for i in range(3):
            w.add_scalar("loss", 1.0 / (i + 1), i)
    client, plugin = make_client(tmp_path)
    assert plugin.is_active() is False
    listing = get_json(client, "/data/plugins_listing")
    assert listing["cockpit_lite"]["enabled"] is False
    assert get_json(client, f"{BASE}/runs") == {"runs": []}
    assert client.get(f"{BASE}/run?run=plain").status_code == 404
    assert client.get(f"{BASE}/run").status_code == 400


def test_static_routes_serve_the_module_and_refuse_traversal(real_root):
    root, _ = real_root
    client, _ = make_client(root)
    resp = client.get(f"{BASE}/static/index.js")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("text/javascript")
    js = resp.get_data(as_text=True)
    assert "export async function render" in js
    assert "innerHTML" not in js and "http://" not in js.replace("http://www.w3.org/2000/svg", "")
    entry = client.get("/data/plugin_entry.html?name=cockpit_lite").get_data(as_text=True)
    assert "./static/index.js" in entry
    for bad in ["../plugin.py", "..%2Fplugin.py", "%2E%2E/plugin.py", "..%5Cplugin.py", "..\\plugin.py",
                "%2e%2e%2fplugin.py", "static/index.js", "/etc/passwd", "index.js%00", "", "sub%2Findex.js",
                "..", "%2F%2Fetc%2Fpasswd", "index.js/..", "./index.js"]:
        r = client.get(f"{BASE}/static/{bad}")
        assert r.status_code == 404, bad
        assert b"render" not in r.get_data(), bad
    for bad in ["../plugin.py", "..\\plugin.py", "a/index.js", "..", "index.js\x00", "/abs.js", "x.py"]:
        assert safe_static_name(bad) is None, bad
    assert safe_static_name("index.js") is not None


def test_run_names_are_passed_as_data_not_markup(tmp_path):
    name = "<img src=x onerror=alert(1)>"
    sink = TensorBoardSink(tmp_path / name)
    sink.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
    sink.close()
    client, _ = make_client(tmp_path)
    runs = get_json(client, f"{BASE}/runs")["runs"]
    assert runs[0]["run"] == name
    body = get_json(client, f"{BASE}/run?run={urllib.parse.quote(name)}")
    assert body["run"] == name and body["scalars"]["loss"]["values"] == [1.0]
    resp = client.get(f"{BASE}/run?run={urllib.parse.quote(name)}")
    assert resp.headers["Content-Type"].startswith("application/json")


def test_importing_cockpit_lite_does_not_import_tensorboard_and_no_tensorflow_is_needed():
    code = ("import sys, cockpit_lite, cockpit_lite.tensorboard; "
            "assert not any(m == 'tensorboard' or m.startswith('tensorboard.') for m in sys.modules), 'tensorboard imported'; "
            "from cockpit_lite.tensorboard.writer import TensorBoardSink; "
            "import cockpit_lite.tensorboard.plugin; "
            "assert 'tensorflow' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [e for e in entry_points(group="tensorboard_plugins") if e.name == "cockpit_lite"]
    assert len(eps) == 1 and eps[0].load() is CockpitLoader


def test_bad_records_give_a_warning_not_a_crash(tmp_path):
    sink = TensorBoardSink(tmp_path / "bad")
    with pytest.warns(RuntimeWarning, match="not a number"):
        sink.write({"type": "step", "step": 0, "values": {"a": "oops", "b": 2.0, "c": torch.tensor(3.0)}})
    sink.write({"type": "header", "format": "cockpit-lite-log"})  # no series: ignored
    sink.write({"type": "no-such-type"})
    sink.close()
    with pytest.raises(RuntimeError, match="closed"):
        sink.write({"type": "step", "step": 1, "values": {}})
    client, _ = make_client(tmp_path)
    body = get_json(client, f"{BASE}/run?run=bad")
    assert body["scalars"] == {"b": {"steps": [0], "values": [2.0]}, "c": {"steps": [0], "values": [3.0]}}


def test_values_older_than_their_tag_go_to_events_not_over_later_steps(tmp_path):
    sink = TensorBoardSink(tmp_path / "late")
    for t in range(3):
        sink.write({"type": "step", "step": t, "values": {"a": float(t)}})
    with pytest.warns(RuntimeWarning, match="arrived after step 2"):
        sink.write({"type": "step", "step": 0, "amends": True, "values": {"a": 9.0}})
    sink.close()
    client, _ = make_client(tmp_path)
    body = get_json(client, f"{BASE}/run?run=late")
    assert body["scalars"]["a"] == {"steps": [0, 1, 2], "values": [0.0, 1.0, 2.0]}
    assert body["events"][-1]["kind"] == "late" and body["events"][-1]["payload"] == {"a": 9.0}
