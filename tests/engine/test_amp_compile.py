"""Mixed precision (bfloat16 autocast on the CPU) and torch.compile'd models.

bfloat16: the statistics are computed in float32 from the low-precision activations, so they agree
with a float32 run of the same steps to bfloat16's precision (8 bits of mantissa), with nothing
unavailable. torch.compile: the hooks stay outside the compiled graph (no graph break for the
first-order set), per-sample quantities are right and say that they break the graph on tracked
steps, and the curvature re-evaluates the original module (compiled graphs have no double backward).
(Skipped steps under a GradScaler: tests/engine/test_step_detection.py and tests/quantities/test_alpha.py.)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite

PER_SAMPLE = ["loss", "grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr", "alpha"]
CURVATURE = ["hess_max_ev", "hess_trace"]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 16), nn.LayerNorm(16),
                         nn.Tanh(), nn.Linear(16, 5))


def _data(steps=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(steps)]


def _train(logdir, quantities, *, autocast=None, compile_model=False, steps=3):
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    forward = torch.compile(model) if compile_model else model
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with cockpit_lite.watch(forward, opt, loss_fn=loss_fn, logdir=logdir,
                                quantities={q: "every" for q in quantities}):
            for x, y in _data(steps):
                opt.zero_grad()
                if autocast is not None:
                    with torch.autocast("cpu", dtype=autocast):
                        loss = loss_fn(forward(x), y)
                else:
                    loss = loss_fn(forward(x), y)
                loss.backward()
                opt.step()
    return cockpit_lite.load(logdir), [str(w.message) for w in caught]


def _values(run, key):
    return [r["values"][key] for r in run.records if r.get("type") == "step" and key in r["values"]]


@pytest.fixture(autouse=True)
def _forget_compiled_graphs():
    """Each test leaves no compiled graphs behind: dynamo's caches, freed later, would leave their
    (fake-tensor) reference cycles in whichever test runs next (tests/engine/test_memory_cycles.py)."""
    yield
    import gc

    torch._dynamo.reset()
    gc.collect()


def test_bfloat16_autocast_agrees_with_float32_to_bfloat16_precision(tmp_path):
    ref, _ = _train(tmp_path / "fp32", PER_SAMPLE)
    amp, _ = _train(tmp_path / "bf16", PER_SAMPLE, autocast=torch.bfloat16)
    for rec in amp.records:
        if rec.get("type") == "step":
            assert not rec.get("reasons"), rec.get("reasons")
    for key in PER_SAMPLE:
        a, b = _values(ref, key), _values(amp, key)
        assert len(a) == len(b) > 0, key
        for x, y in zip(a, b):
            if key == "alpha" and math.isnan(x):
                continue  # the last step's alpha needs the next step
            assert math.isfinite(y), key
            # alpha is a ratio of differences of these values: allow it more
            tol = 0.1 if key == "alpha" else 0.02
            assert abs(x - y) <= tol * max(abs(x), 1e-3), (key, x, y)


def test_compiled_model_first_order_set_adds_no_graph_break(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    ref, _ = _train(tmp_path / "eager", cockpit_lite.presets.preset("default"))
    run, messages = _train(tmp_path / "compiled", cockpit_lite.presets.preset("default"), compile_model=True)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not any("compiled" in m for m in messages)
    for key in ("loss", "grad_norm", "param_norm", "distance", "update_size"):
        for x, y in zip(_values(ref, key), _values(run, key)):
            assert y == pytest.approx(x, rel=1e-5), key


def test_compiled_model_per_sample_and_curvature_are_right_and_say_what_they_cost(tmp_path):
    torch._dynamo.reset()
    ref, _ = _train(tmp_path / "eager", PER_SAMPLE + CURVATURE)
    run, messages = _train(tmp_path / "compiled", PER_SAMPLE + CURVATURE, compile_model=True)
    assert sum("the model is compiled" in m for m in messages) == 1
    assert any("the model is compiled" in e.get("message", "") for e in run.events)
    assert [p["name"] for p in run.header["params"]] == [p["name"] for p in ref.header["params"]]
    for rec in run.records:
        if rec.get("type") == "step":
            assert not rec.get("reasons"), rec.get("reasons")
    for key in PER_SAMPLE + CURVATURE:
        a, b = _values(ref, key), _values(run, key)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b):
            if math.isnan(x):
                assert math.isnan(y)
                continue
            assert y == pytest.approx(x, rel=1e-4, abs=1e-7), key
