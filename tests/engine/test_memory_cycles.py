"""A tracked step leaves no reference cycle behind: what it captured is freed by reference counting
when the step ends, not when Python's cyclic garbage collector happens to run (issue 24, item 1).

Reference: the garbage collector itself. With ``gc.DEBUG_SAVEALL`` a ``gc.collect()`` puts everything it
found unreachable into ``gc.garbage`` instead of freeing it; after a tracked step that list must hold
no tensor and no object of cockpit_lite. With the collector disabled, the live tensors (count, and
bytes of their storages) after 50 tracked steps must equal those after 5.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

import cockpit_lite
from cockpit_lite import presets


def _mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), \
        lambda b: (torch.randn(b, 6), torch.randint(0, 3, (b,)))


def _cnn():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    return model, lambda b: (torch.randn(b, 2, 6, 6), torch.randint(0, 3, (b,)))


class _Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        return self.head(self.block(self.embed(ids)).mean(1))


def _transformer():
    return _Transformer(), lambda b: (torch.randint(0, 10, (b, 5)), torch.randint(0, 3, (b,)))


class _GPT(nn.Module):
    """The layouts read through autograd's graph (persample/broadcast.py, flat_rows.py): a position table on
    arange(T) added to the batch, an attention with a key bias (rounding floors), an MLP on flattened rows."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 8), nn.Embedding(5, 8)
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        h = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))
        h = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2), -1) @ h
        h = h + torch.relu(self.fc(h.reshape(-1, 8))).view(h.shape)
        return self.head(h.mean(1))


def _gpt():
    return _GPT(), lambda b: (torch.randint(0, 10, (b, 5)), torch.randint(0, 3, (b,)))


MODELS = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer, "gpt": _gpt}


@contextmanager
def _collector_off():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


def _training(model_name, optimizer, preset, logdir, schedule="every"):
    torch.manual_seed(0)
    model, data = MODELS[model_name]()
    if optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir,
                                 quantities=presets.preset(preset, schedule))
    return cockpit, _step_of(model, opt, crit, data)


def _step_of(model, opt, crit, data, batch=8):
    """One plain training step on a fresh batch ``data(batch)``."""
    def step():
        x, y = data(batch)
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    return step


def _own_or_tensor(obj) -> bool:
    """Objects of cockpit_lite, and tensors (not the fake tensors of torch.compile's graphs, which are
    dynamo's, freed whenever its caches let go of an earlier test's compiled model)."""
    if type(obj).__name__ == "FakeTensor":
        return False
    return isinstance(obj, torch.Tensor) or type(obj).__module__.startswith("cockpit_lite")


@pytest.mark.parametrize("model_name,optimizer", [("mlp", "sgd"), ("cnn", "adam"), ("transformer", "sgd"), ("gpt", "adam")])
@pytest.mark.parametrize("preset", ["default", "economy", "business", "full"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_tracked_step_leaves_no_cyclic_garbage(tmp_path, model_name, optimizer, preset):
    cockpit, step = _training(model_name, optimizer, preset, tmp_path / "run")
    try:
        step()  # first step: lazy imports and one-off set-up may leave garbage of their own
        with _collector_off():
            gc.set_debug(gc.DEBUG_SAVEALL)
            for _ in range(2):
                step()
                gc.collect()
                held = [type(o).__qualname__ for o in gc.garbage if _own_or_tensor(o)]
                assert not held, f"a tracked step left reference cycles holding {sorted(set(held))}"
                gc.garbage.clear()
    finally:
        cockpit.close()


def _live_tensors():
    """(number of live tensors, bytes of their distinct storages), as the collector's objects see them."""
    count, storages = 0, {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor or type(obj) is nn.Parameter:
            count += 1
            try:
                s = obj.untyped_storage()
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            except (RuntimeError, NotImplementedError):
                pass
    return count, sum(storages.values())


@pytest.mark.parametrize("model_name,optimizer,preset", [("mlp", "adam", "economy"), ("cnn", "sgd", "business"),
                                                          ("gpt", "sgd", "economy")])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_live_tensors_do_not_grow_with_tracked_steps(tmp_path, model_name, optimizer, preset):
    cockpit, step = _training(model_name, optimizer, preset, tmp_path / "run")
    try:
        for _ in range(3):  # optimizer state, buffers made on first use
            step()
        with _collector_off():
            for _ in range(5):
                step()
            after_5 = _live_tensors()
            for _ in range(45):
                step()
            after_50 = _live_tensors()
        assert after_50 == after_5, f"live tensors (count, storage bytes) grew from {after_5} to {after_50}"
    finally:
        cockpit.close()


def _assert_no_cyclic_garbage(step, steps=2):
    with _collector_off():
        gc.set_debug(gc.DEBUG_SAVEALL)
        for _ in range(steps):
            step()
            gc.collect()
            held = [type(o).__qualname__ for o in gc.garbage if _own_or_tensor(o)]
            assert not held, f"a tracked step left reference cycles holding {sorted(set(held))}"
            gc.garbage.clear()


def _assert_no_cyclic_garbage_after_the_first(cockpit, step):
    """``_assert_no_cyclic_garbage`` after a first step (lazy imports and one-off set-up may leave garbage of their
    own); the cockpit closed in any case."""
    try:
        step()
        _assert_no_cyclic_garbage(step)
    finally:
        cockpit.close()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_failing_self_check_leaves_no_cyclic_garbage(tmp_path, monkeypatch):
    """A failure kept for the processes' agreement (``_bracket``) must not keep its traceback: the
    traceback's frames hold the outcome that holds it, and the step's context with its captures."""
    from cockpit_lite.engine import selfcheck

    def failing_check(ctx):
        ctx.per_sample.sq_norms()  # the step's per-sample work is done and held by the frames
        raise RuntimeError("injected self-check failure")

    monkeypatch.setattr(selfcheck, "run", failing_check)
    _assert_no_cyclic_garbage_after_the_first(*_training("mlp", "sgd", "economy", tmp_path / "run"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_failing_quantity_leaves_no_cyclic_garbage(tmp_path):
    from cockpit_lite.quantities import make

    class Failing(type(make("grad_norm"))):
        name = "failing"
        needs = frozenset({"layer_io"})

        def after_step(self, ctx):
            ctx.per_sample.sq_norms()
            raise ValueError("injected failure")

    torch.manual_seed(0)
    model, data = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run",
                                 quantities=["grad_norm", Failing("every")])
    _assert_no_cyclic_garbage_after_the_first(cockpit, _step_of(model, opt, crit, data))
    reasons = cockpit.load().reasons("failing")
    assert reasons and all("injected failure" in why for why in reasons.values())


class _CellLoop(nn.Module):
    """An LSTMCell called per time step: its (h, c) output has no per-sample rule (the replay serves it)."""

    def __init__(self):
        super().__init__()
        self.cell, self.head = nn.LSTMCell(3, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = c = torch.zeros(x.shape[0], 5)
        for t in range(x.shape[1]):
            h, c = self.cell(x[:, t], (h, c))
        return self.head(h)


class _FreqEmbedding(nn.Module):
    """An embedding with scale_grad_by_freq: no per-sample gradients (NaN with the reason)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


@pytest.mark.parametrize("model_cls,inputs", [
    (_CellLoop, lambda b: torch.randn(b, 4, 3)), (_FreqEmbedding, lambda b: torch.randint(0, 10, (b, 5)))])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_a_layer_rule_that_refuses_leaves_no_cyclic_garbage(tmp_path, model_cls, inputs):
    """A layer rule's refusal (``rules.Unsupported``) is kept by the per-sample view for the step: kept with its
    traceback, whose frames hold the view, it kept every layer call of the step (inputs, output gradients) alive
    until the collector ran (6 per step on the LSTMCell loop)."""
    torch.manual_seed(0)
    model, crit = model_cls(), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run",
                                 quantities=["loss", "norm_test", "mean_gsnr"])
    data = lambda b: (inputs(b), torch.randint(0, 3, (b,)))  # noqa: E731
    _assert_no_cyclic_garbage_after_the_first(cockpit, _step_of(model, opt, crit, data, batch=6))
