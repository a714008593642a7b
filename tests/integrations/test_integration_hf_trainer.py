"""Stock Hugging Face models under ``transformers.Trainer`` with ``CockpitTrainerCallback``: the loss
the model computes in ``forward`` is logged (exactly the Trainer's), records carry the Trainer's
``global_step``, and the values reach the Trainer's ``report_to`` integrations."""

import pytest
import torch

import cockpit_lite

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from cockpit_lite.integrations.transformers import CockpitTrainerCallback  # noqa: E402
from test_integration_hf_models import V, bert, gpt2  # noqa: E402

STEPS = 4


class Sequences(torch.utils.data.Dataset):
    def __init__(self, classify=False, n=32):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, V, (n, 8), generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g) if classify else self.x.clone()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def train(model, dataset, out, callback, report_to):
    args = TrainingArguments(output_dir=str(out), use_cpu=True, report_to=report_to, max_steps=STEPS,
                             per_device_train_batch_size=4, logging_steps=1, save_strategy="no", seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    return trainer


def losses_logged_by_the_trainer(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_gpt2_under_the_trainer_logs_its_loss_at_global_step_and_reports_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = CockpitTrainerCallback(quantities={"loss": "every", "grad_norm": "every", "param_norm": "every"})
    trainer = train(gpt2(), Sequences(), tmp_path / "out", callback, report_to=["tensorboard"])

    run = cockpit_lite.load(callback.logdir)
    steps, loss = run.series("loss")
    assert trainer.state.global_step == STEPS
    hf = losses_logged_by_the_trainer(trainer)
    assert list(steps) == sorted(hf) == list(range(1, STEPS + 1))  # the Trainer's global_step
    assert list(loss) == pytest.approx([hf[s] for s in steps], rel=1e-6)

    from tbparse import SummaryReader

    scalars = SummaryReader(str(tmp_path / "tb")).scalars
    ours = scalars[scalars.tag == "train/cockpit/loss"]
    assert list(ours.step) == list(steps)
    assert list(ours.value) == pytest.approx(list(loss), rel=1e-6)
    assert list(scalars[scalars.tag == "train/loss"].step) == list(steps)  # next to the Trainer's own
    tags = set(scalars.tag)
    assert "train/cockpit/grad_norm" in tags and not any("transformer." in t for t in tags)  # totals only


class Recorder(TrainerCallback):
    """A tracker integration registered under report_to="recorder"."""

    instances = []

    def __init__(self):
        self.logs = []
        Recorder.instances.append(self)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def test_bert_under_the_trainer_reports_to_a_registered_integration(tmp_path, monkeypatch):
    from transformers.integrations import integration_utils

    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, "recorder", Recorder)
    Recorder.instances.clear()
    callback = CockpitTrainerCallback(quantities={"loss": "every", "grad_norm": "every"}, report_keys="all")
    trainer = train(bert(), Sequences(classify=True), tmp_path / "out", callback, report_to=["recorder"])

    (recorder,) = Recorder.instances
    received = {step: logs["cockpit/loss"] for step, logs in recorder.logs if "cockpit/loss" in logs}
    hf = losses_logged_by_the_trainer(trainer)
    assert sorted(received) == sorted(hf) == list(range(1, STEPS + 1))
    assert [received[s] for s in sorted(received)] == pytest.approx([hf[s] for s in sorted(hf)], rel=1e-6)
    per_parameter = [k for _, logs in recorder.logs for k in logs if k.startswith("cockpit/grad_norm/")]
    assert "cockpit/grad_norm/classifier.weight" in per_parameter  # report_keys="all"
    assert any("loss" in logs and "cockpit/loss" not in logs for _, logs in recorder.logs)  # the Trainer's own


def test_if_exists_increment_is_followed(tmp_path):
    logdir = tmp_path / "cockpit"
    first = CockpitTrainerCallback(quantities={"loss": "every"}, logdir=logdir, if_exists="increment")
    train(gpt2(), Sequences(), tmp_path / "out", first, report_to=[])
    second = CockpitTrainerCallback(quantities={"loss": "every"}, logdir=logdir, if_exists="increment")
    train(gpt2(), Sequences(), tmp_path / "out", second, report_to=[])
    assert first.logdir == str(logdir) and second.logdir == str(logdir) + "-2"
    assert len(cockpit_lite.load(second.logdir).series("loss")[0]) == STEPS


def test_accumulated_loss_with_num_items_in_batch_equals_the_trainers(tmp_path):
    callback = CockpitTrainerCallback(quantities={"loss": "every"})
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=2,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
                             save_strategy="no", seed=0, disable_tqdm=True, max_grad_norm=0.0)
    trainer = Trainer(model=gpt2(), args=args, train_dataset=Sequences(), callbacks=[callback])
    trainer.train()
    steps, loss = cockpit_lite.load(callback.logdir).series("loss")
    hf = losses_logged_by_the_trainer(trainer)
    assert list(loss) == pytest.approx([hf[s] for s in steps], rel=1e-6)
