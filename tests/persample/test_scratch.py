"""The per-sample pass's reused scratch memory (persample/scratch.py): the slots themselves, and the pass
over blocks that live in a slot, against per-sample gradients from a float64 autograd loop."""

import threading

import pytest
import torch
import torch.nn.functional as F

from cockpit_lite.persample import conv as conv_rule
from cockpit_lite.persample import linear as linear_rule
from cockpit_lite.persample import scratch

BINS = 20


@pytest.fixture(autouse=True)
def fresh_slots():
    scratch.release()
    yield
    scratch.release()


def test_a_slot_is_reused_grown_and_released():
    a = scratch.take("t", (1 << 19,))  # 2 MB
    b = scratch.take("t", (1 << 18,))  # smaller: the same memory
    assert b.data_ptr() == a.data_ptr() and b.shape == (1 << 18,)
    c = scratch.take("t", (3, 1 << 19))  # larger: a new buffer, the old one dropped
    assert c.shape == (3, 1 << 19) and scratch.held_bytes() == 3 * 4 * (1 << 19)
    d = scratch.take("t", (2, 1 << 18), torch.int16)  # another dtype: a buffer of its own
    assert d.dtype == torch.int16 and scratch.held_bytes() == 2 * 2 * (1 << 18)
    scratch.release()
    assert scratch.held_bytes() == 0


def test_small_tensors_and_disabled_slots_are_fresh(monkeypatch):
    small = scratch.take("s", (10,))
    assert scratch.held_bytes() == 0 and small.shape == (10,)
    monkeypatch.setattr(scratch, "ENABLED", False)
    x = scratch.take("s", (1 << 20,))
    y = scratch.take("s", (1 << 20,))
    assert x.data_ptr() != y.data_ptr() and scratch.held_bytes() == 0


def test_slots_are_per_thread():
    main = scratch.take("t", (1 << 19,))
    seen = {}

    def other():
        seen["ptr"] = scratch.take("t", (1 << 19,)).data_ptr()
        seen["held"] = scratch.held_bytes()
        scratch.release()

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["ptr"] != main.data_ptr() and seen["held"] == 4 * (1 << 19)
    assert scratch.take("t", (1 << 19,)).data_ptr() == main.data_ptr()  # the other thread's release left ours


def _conv_reference(module, x, D):
    """[b, P] per-sample weight gradients in float64: d/dW <conv(x_i, W), D_i>, one autograd call per sample."""
    W = module.weight.detach().double().requires_grad_(True)
    rows = []
    for i in range(x.shape[0]):
        out = F.conv2d(x[i:i + 1].double(), W, None, module.stride, module.padding, module.dilation, module.groups)
        (g,) = torch.autograd.grad((out * D[i:i + 1].double()).sum(), W)
        rows.append(g.reshape(-1))
    return torch.stack(rows)


def _linear_reference(A, D):
    """[b, P] per-sample weight gradients sum_t d_t a_t^T in float64, one sample at a time."""
    return torch.stack([(D[i].double().T @ A[i].double()).reshape(-1) for i in range(A.shape[0])])


def _check(ps, G, v, d):
    """fused_stats and the kept blocks' projections of ``ps`` against the float64 per-sample gradients G [b, P]."""
    R = float(G.abs().max()) * 0.8  # some values outside, counted in the edge bins
    res = ps.fused_stats({"sq", "m2", "dots", "hist"}, v, R, BINS, {"dir": d})
    tol = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res["sq"].double(), (G * G).sum(1), **tol)
    torch.testing.assert_close(res["m2"].double().reshape(-1), (G * G).sum(0), **tol)
    torch.testing.assert_close(res["dots"].double(), G @ v.double().reshape(-1), **tol)
    torch.testing.assert_close(res["dir"].double(), G @ d.double().reshape(-1), **tol)
    counts, top, clipped = res["hist"]
    ref = torch.histc(G.clamp(-R, R), BINS, -R, R)
    assert float((counts - ref).abs().sum()) <= 0.002 * G.numel()  # float32 values near bin edges may move
    assert clipped == int((G.abs() > R).sum()) and top == pytest.approx(float(G.abs().max()), rel=1e-5)
    kept = []  # the blocks kept for a projection after the step: their own memory, not the slot's
    ps.fused_stats({"sq"}, None, None, BINS, None, keep=kept)
    ps.fused_stats({"sq", "m2"}, None, None, BINS, None)  # a second pass through the slot in between
    torch.testing.assert_close(ps.kept_dots(kept, d).double(), G @ d.double().reshape(-1), **tol)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("method", ["shifts", "grouped"])
@pytest.mark.parametrize("cfg", [(3, 8, 9, 1), (6, 4, 7, 2)])  # (in, out, side, stride)
def test_conv_pass_on_reused_blocks_matches_bruteforce(monkeypatch, method, cfg, layout):
    C, O, H, stride = cfg
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)  # every block through a slot
    torch.manual_seed(0)
    module = torch.nn.Conv2d(C, O, 3, stride=stride, padding=1)
    x = torch.randn(11, C, H, H)
    D = torch.randn(11, O, *module(x).shape[2:])
    if layout == "channels_last":  # strided windows: copied into their slot
        x, D = x.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
    monkeypatch.setattr(conv_rule, "_CHUNK_FLOATS", 3 * module.weight.numel())  # blocks of 3 samples (4 blocks)
    ps = conv_rule.ConvWeightSamples(module, x, D)
    ps._method = method
    G = _conv_reference(module, x, D)
    v, d = torch.randn_like(module.weight), torch.randn_like(module.weight)
    _check(ps, G, v, d)
    assert float(ps.max_abs()) == pytest.approx(float(G.abs().max()), rel=1e-5)


def test_sequence_linear_pass_on_reused_blocks_matches_bruteforce(monkeypatch):
    monkeypatch.setattr(scratch, "MIN_BYTES", 0)
    torch.manual_seed(1)
    A, D = torch.randn(10, 5, 6), torch.randn(10, 5, 4)
    monkeypatch.setattr(linear_rule, "_CHUNK_FLOATS", 3 * 24)  # blocks of 3 samples
    ps = linear_rule.LinearWeightSamples(A, D)
    G = _linear_reference(A, D)
    _check(ps, G, torch.randn(4, 6), torch.randn(4, 6))
    assert float(ps.max_abs()) == pytest.approx(float(G.abs().max()), rel=1e-5)


def test_the_engine_releases_the_slots_at_every_step_end(tmp_path, monkeypatch):
    """A watched CNN with the economy preset: the pass takes slots during the step, none is held after it."""
    import cockpit_lite
    from cockpit_lite.presets import preset

    monkeypatch.setattr(scratch, "MIN_BYTES", 0)
    taken, held = [], []
    orig = scratch.take

    def recording(slot, *args, **kwargs):
        taken.append(slot)
        return orig(slot, *args, **kwargs)

    monkeypatch.setattr(scratch, "take", recording)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    crit = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(16, 3, 7, 7), torch.randint(0, 3, (16,))
    with cockpit_lite.watch(net, opt, loss_fn=crit, logdir=tmp_path, quantities=preset("economy", "every")):
        for _ in range(3):
            opt.zero_grad()
            crit(net(x), y).backward()
            opt.step()
            held.append(scratch.held_bytes())
    assert "conv_dirs" in taken and held == [0, 0, 0]
