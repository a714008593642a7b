"""CockpitCallback with a real Lightning Trainer (CPU, tiny MLP) against the plain-loop ``watch``.

The reference is an independent run: a deep copy of the same initial module, trained by a hand
written loop over the same batches with the same optimizer (and the same 1/accumulation loss
scaling as Lightning), observed by ``cockpit_lite.watch``. Every logged scalar (loss, gradient and
parameter norms, distance, update size, lr, the gradient tests and alpha) must agree.
"""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite

L = pytest.importorskip("lightning")
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger  # noqa: E402

from cockpit_lite.integrations.lightning import CockpitCallback  # noqa: E402
from series_compare import assert_same_series  # noqa: E402


QUANTITIES = {name: "every" for name in
              ("loss", "grad_norm", "param_norm", "distance", "update_size", "lr", "norm_test", "inner_test", "alpha")}
BATCH = 8


class Classifier(L.LightningModule):
    """A tiny MLP; ``loss_fn`` is the loss module the callback finds by convention."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self):
        return make_optimizer(self)


def make_optimizer(module):
    return torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)


def data(n=48):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def loader():
    x, y = data()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def fresh_module():
    torch.manual_seed(1)
    return Classifier()


def fit(module, tmp_path, callback, max_steps, accumulate=1, logger=None):
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate,
                        callbacks=[callback], log_every_n_steps=1,
                        logger=logger if logger is not None else CSVLogger(tmp_path / "csv"),
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(module, loader())
    return trainer


def plain_loop(module, logdir, steps, accumulate=1):
    """The reference: the same batches, optimizer and loss scaling in a hand-written loop."""
    optimizer = make_optimizer(module)
    with cockpit_lite.watch(module, optimizer, loss_fn=module.loss_fn, logdir=logdir, quantities=QUANTITIES):
        batches = iter(loader())
        for _ in range(steps):
            optimizer.zero_grad()
            for _ in range(accumulate):
                x, y = next(batches)
                (module.loss_fn(module(x), y) / accumulate).backward()
            optimizer.step()
    return cockpit_lite.load(logdir)


def test_fit_logs_what_the_plain_loop_logs(tmp_path):
    module = fresh_module()
    reference_module = copy.deepcopy(module)
    callback = CockpitCallback(quantities=QUANTITIES)
    logger = TensorBoardLogger(tmp_path / "tb", name="exp")
    trainer = fit(module, tmp_path, callback, max_steps=5, logger=logger)

    assert callback.cockpit.closed
    assert callback.logdir.startswith(logger.log_dir)  # default: inside the logger's version folder
    run = cockpit_lite.load(callback.logdir)
    assert [r["step"] for r in run.records if not r.get("amends")] == [0, 1, 2, 3, 4]
    assert all(r["backward_passes"] == 1 and r["samples"] == BATCH for r in run.records if not r.get("amends"))
    ref = plain_loop(reference_module, tmp_path / "ref", steps=5)
    assert_same_series(run, ref, families=QUANTITIES, steps=5)
    # the parameters Lightning trained are the ones of the reference loop
    for p, q in zip(module.parameters(), reference_module.parameters()):
        torch.testing.assert_close(p, q)

    # the Trainer's TensorBoard logger got the scalars, at the trainer's global steps
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(logger.log_dir)
    events.Reload()
    scalars = events.Scalars("cockpit/grad_norm")
    assert [e.step for e in scalars] == [0, 1, 2, 3, 4]
    assert trainer.global_step == 5
    torch.testing.assert_close(torch.tensor([e.value for e in scalars]),
                               torch.as_tensor(ref.series("grad_norm")[1], dtype=torch.float32))
    alpha_steps, alpha = ref.series("alpha")  # amendments: step t's alpha arrives with step t+1
    assert [e.step for e in events.Scalars("cockpit/alpha")] == list(alpha_steps)
    torch.testing.assert_close(torch.tensor([e.value for e in events.Scalars("cockpit/alpha")]),
                               torch.as_tensor(alpha, dtype=torch.float32), equal_nan=True)


def test_gradient_accumulation_gives_one_record_per_optimizer_step(tmp_path):
    module = fresh_module()
    reference_module = copy.deepcopy(module)
    callback = CockpitCallback(quantities=QUANTITIES, logdir=tmp_path / "cockpit")
    fit(module, tmp_path, callback, max_steps=3, accumulate=2)

    run = cockpit_lite.load(tmp_path / "cockpit")
    steps = [r for r in run.records if not r.get("amends")]
    assert [r["step"] for r in steps] == [0, 1, 2]
    assert all(r["backward_passes"] == 2 and r["samples"] == 2 * BATCH for r in steps)
    ref = plain_loop(reference_module, tmp_path / "ref", steps=3, accumulate=2)
    assert_same_series(run, ref, families=QUANTITIES, steps=3)


def test_amp_with_a_grad_scaler_logs_unscaled_gradients(tmp_path):
    """16-bit AMP with a GradScaler on the CPU: the cockpit sees the gradients after unscaling."""
    from lightning.pytorch.plugins import MixedPrecision

    module = fresh_module()
    reference_module = copy.deepcopy(module)
    callback = CockpitCallback(quantities=QUANTITIES, logdir=tmp_path / "cockpit")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[callback], logger=False,
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(module, loader())
    run = cockpit_lite.load(tmp_path / "cockpit")

    optimizer, scaler = make_optimizer(reference_module), torch.amp.GradScaler("cpu")
    with cockpit_lite.watch(reference_module, optimizer, loss_fn=reference_module.loss_fn, logdir=tmp_path / "ref",
                            quantities=QUANTITIES):
        for (x, y), _ in zip(loader(), range(3)):
            optimizer.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
                loss = reference_module.loss_fn(reference_module(x), y)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
    ref = cockpit_lite.load(tmp_path / "ref")
    assert scaler.get_scale() > 1000  # the gradients were scaled: unscaled ones are what must match
    assert_same_series(run, ref, families=QUANTITIES, steps=3)


def test_without_a_loss_module_it_warns_and_still_logs_the_gradients(tmp_path):
    module = fresh_module()
    del module.loss_fn
    module.training_step = lambda batch, batch_idx: nn.functional.cross_entropy(module(batch[0]), batch[1])
    callback = CockpitCallback(logdir=tmp_path / "cockpit")
    with pytest.warns(RuntimeWarning, match="no loss module found"):
        fit(module, tmp_path, callback, max_steps=2)
    run = cockpit_lite.load(tmp_path / "cockpit")
    assert len(run.series("grad_norm")[0]) == 2
    assert all(math.isfinite(v) for v in run.series("grad_norm")[1])


def test_training_step_that_bypasses_forward_is_warned_about_and_model_option_fixes_it(tmp_path):
    def bypassing_module():
        module = fresh_module()
        module.training_step = lambda batch, batch_idx: module.loss_fn(module.net(batch[0]), batch[1])
        return module

    with pytest.warns(RuntimeWarning, match="did not call the forward"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*per-sample statistics need")  # the consequence, logged as NaN
        fit(bypassing_module(), tmp_path, CockpitCallback(quantities=QUANTITIES, logdir=tmp_path / "a"), max_steps=2)
    module = bypassing_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        fit(module, tmp_path, CockpitCallback(quantities=QUANTITIES, logdir=tmp_path / "b", model=module.net),
            max_steps=2)
    norm_test = cockpit_lite.load(tmp_path / "b").series("norm_test")[1]
    assert len(norm_test) == 2 and all(math.isfinite(v) for v in norm_test)


def test_an_exception_in_fit_closes_the_run_log(tmp_path):
    module = fresh_module()
    step = module.training_step

    def failing_step(batch, batch_idx):
        if batch_idx == 2:
            raise ValueError("boom")
        return step(batch, batch_idx)

    module.training_step = failing_step
    callback = CockpitCallback(logdir=tmp_path / "cockpit")
    with pytest.raises(ValueError, match="boom"):
        fit(module, tmp_path, callback, max_steps=5)
    assert callback.cockpit.closed
    run = cockpit_lite.load(tmp_path / "cockpit")
    assert run.finished and len(run.series("grad_norm")[0]) == 2


def test_logger_sink_keeps_each_keys_steps_increasing_and_sends_totals_by_default():
    from cockpit_lite.integrations.logger_sink import LoggerSink

    class Logger:
        def __init__(self):
            self.calls, self.saved = [], 0

        def log_metrics(self, metrics, step):
            self.calls.extend((k, v, step) for k, v in metrics.items())

        def save(self):
            self.saved += 1

    logger = Logger()
    sink = LoggerSink([logger], step_offset=10)
    sink.open_run({"params": [{"name": "fc.weight"}]})
    sink.write({"type": "step", "step": 0, "values": {"loss": 2.0, "alpha": "NaN", "grad_norm/fc.weight": 1.0,
                                                      "hess_trace/stderr": 0.5}})
    sink.write({"type": "step", "step": 1, "values": {"loss": 1.5}})
    sink.write({"type": "step", "step": 0, "amends": True, "values": {"alpha": 0.25, "loss": 9.0}})
    sink.write({"type": "skipped", "step": 2, "reason": "inf"})
    sink.close()
    loss = [(v, st) for t, v, st in logger.calls if t == "cockpit/loss"]
    alpha = [(v, st) for t, v, st in logger.calls if t == "cockpit/alpha"]
    assert loss == [(2.0, 10), (1.5, 11)]  # the late loss of step 0 would read as a restart: left out
    assert math.isnan(alpha[0][0]) and alpha[1:] == [(0.25, 10)]
    tags = {t for t, _, _ in logger.calls}
    assert "cockpit/hess_trace/stderr" in tags and "cockpit/grad_norm/fc.weight" not in tags  # totals only
    assert logger.saved == 1


def test_ddp_fit_observes_the_global_batch(tmp_path):
    """strategy="ddp" with two CPU processes (gloo; tests/lightning_ddp_worker.py): every process watches,
    statistics are reduced over both, process 0 writes the log, which equals the plain loop's on the
    global batches (each the concatenation of the two shards)."""
    import subprocess
    import sys
    from pathlib import Path

    import lightning_ddp_worker as worker

    logdir = tmp_path / "cockpit"
    proc = subprocess.run([sys.executable, str(Path(worker.__file__)), str(logdir)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cockpit_lite.load(logdir)
    steps = [r for r in run.records if not r.get("amends")]
    assert [r["step"] for r in steps] == list(range(worker.STEPS))
    assert all(r["backward_passes"] == 1 and r["samples"] == 2 * worker.HALF for r in steps)
    assert run.records[0]["data"]["persample_check"]["status"] == "passed"

    reference_module = fresh_module()
    optimizer = make_optimizer(reference_module)
    x, y = data()
    with cockpit_lite.watch(reference_module, optimizer, loss_fn=reference_module.loss_fn, logdir=tmp_path / "ref",
                            quantities=QUANTITIES):
        for xb, yb in worker.global_batches(x, y):
            optimizer.zero_grad()
            reference_module.loss_fn(reference_module(xb), yb).backward()
            optimizer.step()
    # float32 sums in another order (two shards, then across processes): 1e-5 relative
    assert_same_series(run, cockpit_lite.load(tmp_path / "ref"), families=QUANTITIES, steps=worker.STEPS, rtol=1e-5)


def _fit_with_loggers(tmp_path, loggers, **callback_options):
    callback = CockpitCallback(quantities={"loss": "every", "grad_norm": "every", "alpha": "every"},
                               **callback_options)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, callbacks=[callback], log_every_n_steps=1,
                        logger=loggers, enable_progress_bar=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(fresh_module(), loader())
    return callback, trainer


def test_every_logger_receives_the_totals_through_log_metrics(tmp_path):
    import csv

    from lightning.pytorch.loggers import Logger

    class Recording(Logger):
        name, version = "recording", 0

        def __init__(self):
            super().__init__()
            self.rows = []

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    csv_logger, recording = CSVLogger(tmp_path / "csv", name="exp"), Recording()
    callback, _ = _fit_with_loggers(tmp_path, [csv_logger, recording])
    run = cockpit_lite.load(callback.logdir)
    steps, grad_norm = run.series("grad_norm")
    assert list(steps) == [0, 1, 2, 3, 4]

    with open(csv_logger.experiment.metrics_file_path) as f:
        rows = [r for r in csv.DictReader(f) if r.get("cockpit/grad_norm")]
    assert [int(r["step"]) for r in rows] == list(steps)
    assert [float(r["cockpit/grad_norm"]) for r in rows] == pytest.approx(list(grad_norm), rel=1e-6)
    assert not any(k.startswith("cockpit/grad_norm/") for k in rows[0])  # totals only, by default

    got = {}
    for step, metrics in recording.rows:
        for key, value in metrics.items():
            got.setdefault(key, []).append((step, value))
    alpha_steps, alpha = run.series("alpha")  # amendments: each at its own step
    assert [s for s, _ in got["cockpit/alpha"] if not math.isnan(_)] == [s for s, a in zip(alpha_steps, alpha)
                                                                         if not math.isnan(a)]
    assert [v for _, v in got["cockpit/grad_norm"]] == pytest.approx(list(grad_norm), rel=1e-9)


def test_logger_keys_choose_what_the_loggers_get(tmp_path):
    from lightning.pytorch.loggers import Logger

    class Keys(Logger):
        name, version = "keys", 0

        def __init__(self):
            super().__init__()
            self.keys = set()

        def log_metrics(self, metrics, step=None):
            self.keys.update(metrics)

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    every, chosen = Keys(), Keys()
    _fit_with_loggers(tmp_path / "a", [every], logger_keys="all")
    _fit_with_loggers(tmp_path / "b", [chosen], logger_keys=["loss", "grad_norm"])
    assert "cockpit/grad_norm/net.0.weight" in every.keys
    assert {k for k in chosen.keys if k.startswith("cockpit/")} == {"cockpit/loss", "cockpit/grad_norm"}


def test_mlflow_logger_receives_the_values(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store in maintenance mode
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()
    logger = MLFlowLogger(experiment_name="cockpit", tracking_uri=uri)
    callback, _ = _fit_with_loggers(tmp_path, [logger])
    history = MlflowClient(tracking_uri=uri).get_metric_history(logger.run_id, "cockpit/grad_norm")
    steps, grad_norm = cockpit_lite.load(callback.logdir).series("grad_norm")
    assert sorted(m.step for m in history) == list(steps)
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(list(grad_norm), rel=1e-6)


def test_if_exists_increment_is_followed(tmp_path):
    logdir = tmp_path / "cockpit"
    first, _ = _fit_with_loggers(tmp_path, False, logdir=logdir, if_exists="increment")
    second, _ = _fit_with_loggers(tmp_path, False, logdir=logdir, if_exists="increment")
    assert first.logdir == str(logdir) and second.logdir == str(logdir) + "-2"
    assert len(cockpit_lite.load(second.logdir).series("grad_norm")[0]) == 5


def test_a_hugging_face_model_inside_a_lightning_module_needs_no_loss_fn(tmp_path):
    """``training_step`` returns ``self.model(**batch).loss``: the callback observes the stock model's own loss."""
    pytest.importorskip("transformers")
    from test_integration_hf_models import V, gpt2

    class LanguageModel(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = gpt2()

        def training_step(self, batch, batch_idx):
            out = self.model(input_ids=batch[0], labels=batch[0])
            self.losses.append(float(out.loss))
            return out.loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    module = LanguageModel()
    module.losses = []
    x = torch.randint(0, V, (16, 8), generator=torch.Generator().manual_seed(0))
    callback = CockpitCallback(model=module.model, quantities={"loss": "every", "grad_norm": "every"})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, callbacks=[callback], logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "no loss module found"
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        warnings.filterwarnings("ignore", category=UserWarning)
        trainer.fit(module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4))
    steps, loss = cockpit_lite.load(callback.logdir).series("loss")
    assert list(steps) == [0, 1, 2] and list(loss) == module.losses
