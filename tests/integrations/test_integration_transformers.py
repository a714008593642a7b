"""CockpitTrainerCallback with a real Hugging Face Trainer (CPU, tiny MLP) against the plain-loop ``watch``.

The reference is an independent run: a deep copy of the same initial model, trained by a hand
written loop over the same batches with the same optimizer, learning-rate schedule, loss scaling
(1/accumulation) and gradient clipping as the Trainer, observed by ``cockpit_lite.watch``. Every
logged scalar (loss, gradient and parameter norms, distance, update size, lr, the gradient tests and
alpha) must agree.
"""

import copy
import math

import pytest
import torch
from torch import nn

import cockpit_lite

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import Trainer, TrainingArguments  # noqa: E402

from cockpit_lite.integrations.transformers import CockpitTrainerCallback  # noqa: E402
from series_compare import assert_same_series  # noqa: E402


QUANTITIES = {name: "every" for name in
              ("loss", "grad_norm", "param_norm", "distance", "update_size", "lr", "norm_test", "inner_test", "alpha")}
BATCH = 8


class TinyClassifier(nn.Module):
    """A model in the Hugging Face style: ``forward`` computes the loss when given labels, through
    the ``loss_fn`` module the callback finds by convention."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.loss_fn = nn.CrossEntropyLoss()

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = self.loss_fn(logits, labels)
        return out


class Samples(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def optimizer_and_schedule(model):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1.0 + step))


def fresh_model():
    torch.manual_seed(1)
    return TinyClassifier()


def train(model, tmp_path, callback, max_steps, accumulate=1, max_grad_norm=0.0):
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=max_steps,
                             per_device_train_batch_size=BATCH, gradient_accumulation_steps=accumulate,
                             max_grad_norm=max_grad_norm, seed=0, dataloader_num_workers=0,
                             train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Samples(), optimizers=optimizer_and_schedule(model),
                      callbacks=[callback])
    trainer.train()
    return trainer


def plain_loop(model, logdir, steps, accumulate=1, max_grad_norm=0.0):
    """The reference: the same batches, optimizer, schedule, loss scaling and clipping by hand."""
    optimizer, schedule = optimizer_and_schedule(model)
    data = Samples()
    with cockpit_lite.watch(model, optimizer, loss_fn=model.loss_fn, logdir=logdir, quantities=QUANTITIES):
        start = 0
        for _ in range(steps):
            for _ in range(accumulate):
                x, y = data.x[start:start + BATCH], data.y[start:start + BATCH]
                start += BATCH
                (model(x, labels=y)["loss"] / accumulate).backward()
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            schedule.step()
            model.zero_grad()
    return cockpit_lite.load(logdir)


def step_records(run):
    return [r for r in run.records if not r.get("amends")]


def test_train_logs_what_the_plain_loop_logs(tmp_path):
    model = fresh_model()
    reference_model = copy.deepcopy(model)
    callback = CockpitTrainerCallback(quantities=QUANTITIES)
    train(model, tmp_path, callback, max_steps=4)

    assert callback.cockpit.closed
    assert callback.logdir == str(tmp_path / "out" / "cockpit")
    run = cockpit_lite.load(callback.logdir)
    assert [r["step"] for r in step_records(run)] == [1, 2, 3, 4]  # the Trainer's global_step
    assert all(r["backward_passes"] == 1 and r["samples"] == BATCH for r in step_records(run))
    ref = plain_loop(reference_model, tmp_path / "ref", steps=4)
    assert_same_series(run, ref, families=QUANTITIES, steps=4, step_offset=1)
    assert list(run.series("lr")[1]) == pytest.approx([0.1, 0.05, 0.1 / 3, 0.025])
    for p, q in zip(model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)


def test_accumulation_and_clipping_log_the_gradients_the_optimizer_uses(tmp_path):
    model = fresh_model()
    reference_model = copy.deepcopy(model)
    callback = CockpitTrainerCallback(quantities=QUANTITIES, logdir=tmp_path / "cockpit")
    train(model, tmp_path, callback, max_steps=3, accumulate=2, max_grad_norm=0.3)

    run = cockpit_lite.load(tmp_path / "cockpit")
    assert [r["step"] for r in step_records(run)] == [1, 2, 3]
    assert all(r["backward_passes"] == 2 and r["samples"] == 2 * BATCH for r in step_records(run))
    ref = plain_loop(reference_model, tmp_path / "ref", steps=3, accumulate=2, max_grad_norm=0.3)
    assert_same_series(run, ref, families=QUANTITIES, steps=3, step_offset=1)
    # the logged norm is the clipped one (clipping happens before optimizer.step)
    assert max(run.series("grad_norm")[1]) <= 0.3 * (1 + 1e-6)


def test_without_a_loss_module_it_warns_and_still_logs_the_gradients(tmp_path):
    model = fresh_model()
    loss_fn = model.loss_fn
    del model.loss_fn
    model.forward = lambda x, labels=None: {"loss": loss_fn(model.net(x), labels)}
    callback = CockpitTrainerCallback(logdir=tmp_path / "cockpit")
    with pytest.warns(RuntimeWarning, match="no loss module found"):
        train(model, tmp_path, callback, max_steps=2)
    grad_norm = cockpit_lite.load(tmp_path / "cockpit").series("grad_norm")[1]
    assert len(grad_norm) == 2 and all(math.isfinite(v) for v in grad_norm)


def test_ddp_train_observes_the_global_batch(tmp_path):
    """Two CPU processes under torchrun (gloo; tests/transformers_ddp_worker.py): every process
    watches, statistics are reduced over both, process 0 writes the log, which equals the plain loop's
    on the global batches (the two processes' batches, concatenated)."""
    import subprocess
    import sys
    from pathlib import Path

    import transformers_ddp_worker as worker

    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(worker.__file__)), str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = cockpit_lite.load(tmp_path / "cockpit")
    steps = step_records(run)
    assert [r["step"] for r in steps] == list(range(1, worker.STEPS + 1))  # the Trainer's global_step
    assert all(r["backward_passes"] == 1 and r["samples"] == 2 * BATCH for r in steps)
    # the model returns a dict and computes its loss inside forward: the self-check replays it all the same
    assert run.records[0]["data"]["persample_check"]["status"] == "passed"

    shards = [torch.load(tmp_path / f"batches-{r}.pt") for r in range(2)]
    assert [len(s) for s in shards] == [worker.STEPS] * 2
    model = fresh_model()
    optimizer, schedule = optimizer_and_schedule(model)
    with cockpit_lite.watch(model, optimizer, loss_fn=model.loss_fn, logdir=tmp_path / "ref", quantities=QUANTITIES):
        for (x0, y0), (x1, y1) in zip(*shards):
            model(torch.cat([x0, x1]), labels=torch.cat([y0, y1]))["loss"].backward()
            optimizer.step()
            schedule.step()
            model.zero_grad()
    # float32 sums in another order (two shards, then across processes): 1e-5 relative
    assert_same_series(run, cockpit_lite.load(tmp_path / "ref"), families=QUANTITIES, steps=worker.STEPS, rtol=1e-5,
                       step_offset=1)
