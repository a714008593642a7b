"""Tracker sinks for plain loops (cockpit_lite.sinks): W&B and MLflow, with fake client modules
injected into sys.modules where the packages are absent (and the real MLflow file store when present)."""

import math
import sys
import types

import pytest
import torch
from torch import nn

from helpers import watched_training
from cockpit_lite.sinks.keys import key_filter

QUANTITIES = {"loss": "every", "grad_norm": "every", "alpha": "every"}


def train(logdir, sinks, steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]
    return watched_training(model, optimizer, crit, batches, logdir, quantities=QUANTITIES, sinks=sinks).run


class FakeWandbRun:
    def __init__(self):
        self.rows, self.defined, self.finished = [], [], False

    def log(self, row):
        self.rows.append(dict(row))

    def define_metric(self, name, step_metric=None):
        self.defined.append((name, step_metric))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.run = None
    module.inits = []

    def init(**kwargs):
        module.inits.append(kwargs)
        module.run = FakeWandbRun()
        return module.run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_wandb_sink_logs_each_step_with_its_step_key(tmp_path, fake_wandb):
    from cockpit_lite.sinks import WandbSink

    sink = WandbSink(project="demo")
    run = train(tmp_path / "run", [sink])
    wb = fake_wandb.run
    assert fake_wandb.inits == [{"project": "demo"}] and wb.finished  # started here, so finished here
    assert ("cockpit/*", "cockpit/step") in wb.defined
    loss_rows = [r for r in wb.rows if "cockpit/loss" in r]
    steps, loss = run.series("loss")
    assert [r["cockpit/step"] for r in loss_rows] == list(steps)
    assert [r["cockpit/loss"] for r in loss_rows] == pytest.approx(list(loss), rel=1e-12)
    alpha_steps, alpha = run.series("alpha")
    got = {r["cockpit/step"]: r["cockpit/alpha"] for r in wb.rows if "cockpit/alpha" in r}
    assert [s for s in alpha_steps if not math.isnan(alpha[list(alpha_steps).index(s)])] == \
        [s for s, v in sorted(got.items()) if not math.isnan(v)]
    params = {p["name"] for p in run.header["params"]}  # totals: no grad_norm/<param>, but alpha/stderr
    assert not any(k[len("cockpit/"):].partition("/")[2] in params for r in wb.rows for k in r)
    assert any("cockpit/alpha/stderr" in r for r in wb.rows)


def test_wandb_sink_uses_the_active_run_and_leaves_it_open(tmp_path, fake_wandb):
    from cockpit_lite.sinks import WandbSink

    fake_wandb.run = active = FakeWandbRun()
    train(tmp_path / "run", [WandbSink(keys="all")])
    assert fake_wandb.inits == [] and not active.finished
    assert any("cockpit/grad_norm/0.weight" in r for r in active.rows)


class FakeMlflow(types.ModuleType):
    def __init__(self):
        super().__init__("mlflow")
        self.logged, self.started, self.ended, self._active = [], 0, 0, None

    def active_run(self):
        return self._active

    def start_run(self):
        self.started += 1
        self._active = types.SimpleNamespace(info=types.SimpleNamespace(run_id="r1"))
        return self._active

    def end_run(self):
        self.ended += 1
        self._active = None

    def set_tracking_uri(self, uri):
        self.uri = uri

    def log_metrics(self, metrics, step=None, run_id=None):
        self.logged.append((run_id, step, dict(metrics)))


def test_mlflow_sink_with_a_fake_client(tmp_path, monkeypatch):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    from cockpit_lite.sinks import MLflowSink

    run = train(tmp_path / "run", [MLflowSink(keys=["loss", "grad_norm"])])
    assert fake.started == fake.ended == 1
    steps, grad_norm = run.series("grad_norm")
    rows = [(s, m["cockpit/grad_norm"]) for rid, s, m in fake.logged if "cockpit/grad_norm" in m]
    assert all(rid == "r1" for rid, _, _ in fake.logged)
    assert [s for s, _ in rows] == list(steps)
    assert [v for _, v in rows] == pytest.approx(list(grad_norm), rel=1e-12)
    assert {k for _, _, m in fake.logged for k in m} == {"cockpit/loss", "cockpit/grad_norm"}

    fake.logged.clear()  # a given run: neither started nor ended here
    train(tmp_path / "run2", [MLflowSink(run_id="given", tracking_uri="file:/tmp/x")])
    assert fake.started == fake.ended == 1 and fake.uri == "file:/tmp/x"
    assert fake.logged and all(rid == "given" for rid, _, _ in fake.logged)


def test_mlflow_sink_with_a_file_store(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    from cockpit_lite.sinks import MLflowSink

    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    with mlflow.start_run() as active:
        run = train(tmp_path / "run", [MLflowSink()])
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(active.info.run_id, "cockpit/loss")
    steps, loss = run.series("loss")
    assert sorted(m.step for m in history) == list(steps)
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(loss), rel=1e-6)
    # a value and its sub-value side by side (alpha, alpha/stderr): the file store keeps "a/b" in a folder "a"
    se_steps, se = run.series("alpha/stderr")
    assert len(se_steps)
    history = client.get_metric_history(active.info.run_id, "cockpit/alpha.stderr")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(se), rel=1e-6)


@pytest.mark.parametrize("module, cls", [("wandb", "WandbSink"), ("mlflow", "MLflowSink")])
def test_sinks_say_how_to_install_their_package(monkeypatch, module, cls):
    import cockpit_lite.sinks as sinks

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=f"pip install {module}"):
        getattr(sinks, cls)()


def test_key_filters():
    names = frozenset({"fc.weight", "fc.bias"})
    totals, everything = key_filter("totals"), key_filter("all")
    patterns, chosen = key_filter(["loss", "grad_norm*"]), key_filter(lambda k: k.startswith("alpha"))
    keys = ["loss", "grad_norm", "grad_norm/fc.weight", "hess_trace/stderr", "time/cockpit", "alpha"]
    assert [k for k in keys if totals(k, names)] == ["loss", "grad_norm", "hess_trace/stderr", "time/cockpit", "alpha"]
    assert [k for k in keys if everything(k, names)] == keys
    assert [k for k in keys if patterns(k, names)] == ["loss", "grad_norm", "grad_norm/fc.weight"]
    assert [k for k in keys if chosen(k, names)] == ["alpha"]
    with pytest.raises(ValueError, match="totals"):
        key_filter("total")


def test_a_failing_tracker_is_detached_and_training_goes_on(tmp_path, fake_wandb):
    from cockpit_lite.sinks import WandbSink

    sink = WandbSink()
    fake_wandb.run.log = lambda row: (_ for _ in ()).throw(ConnectionError("offline"))
    with pytest.warns(RuntimeWarning, match="WandbSink failed"):
        run = train(tmp_path / "run", [sink])
    assert len(run.series("loss")[0]) == 3 and run.finished
