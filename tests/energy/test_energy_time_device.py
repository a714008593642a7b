"""``time/device``: CUDA-event step times resolved without synchronising, written as amendments.

On CPU the events are fakes with a known completion time (``elapsed_s`` = difference of those
times), so the test checks the resolution logic: every step gets exactly the interval between its
end event and the previous one, whether it completed before the next step or only at close.
"""

import math
import time

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.quantities.time import StepTime


class FakeTimedEvent:
    """Completes ``latency`` s after it is recorded; pending until then (query False)."""

    def __init__(self, latency):
        self.latency = latency
        self.done_at = None
        self.synchronized = False

    def record(self):
        self.done_at = time.perf_counter() + self.latency

    def query(self):
        return time.perf_counter() >= self.done_at

    def synchronize(self):
        self.synchronized = True
        while not self.query():
            time.sleep(1e-4)

    def elapsed_s(self, end):
        assert self.query() and end.query(), "elapsed time of an event that has not completed"
        return end.done_at - self.done_at


def run_with(events, logdir, steps=6, schedule=None, device="cpu", sleep_s=0.003):
    model = nn.Linear(3, 2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.MSELoss()
    x, y = torch.randn(8, 3, device=device), torch.randn(8, 2, device=device)
    q = StepTime(schedule, make_event=events) if events is not None else StepTime(schedule)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities=["loss", q]):
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            time.sleep(sleep_s)
            opt.step()
    return cockpit_lite.load(logdir)


@pytest.mark.parametrize("latency", [0.0, 0.02])
def test_device_time_of_every_step_from_fake_events(logdir, latency):
    made = []

    def events(index):
        made.append(FakeTimedEvent(latency))
        return made[-1]

    # each step lasts longer than an event's latency, so every event but the last completes during
    # the run, however fast the machine is
    run = run_with(events, logdir, sleep_s=max(0.003, 2 * latency))
    steps, dev = run.series("time/device")
    assert list(steps) == list(range(6))
    expected = [made[i + 1].done_at - made[i].done_at for i in range(6)]
    assert list(dev) == pytest.approx(expected, rel=1e-12)
    _, wall = run.series("time")
    assert all(d > 0 for d in dev) and all(math.isfinite(w) for w in wall)
    if latency:  # slow events were not waited for during the run (only at close, for the last ones)
        assert not made[1].synchronized and made[-1].synchronized


def test_device_time_is_nan_when_the_previous_step_was_not_tracked(logdir):
    run = run_with(lambda i: FakeTimedEvent(0.0), logdir, steps=5, schedule="every:2")
    steps, dev = run.series("time/device")
    assert list(steps) == [0, 2, 4]
    assert math.isfinite(dev[0]) and math.isnan(dev[1]) and math.isnan(dev[2])
    assert "not tracked" in run.reasons("time/device")[2]


def test_cpu_model_has_no_device_time(logdir):
    run = run_with(None, logdir, steps=2)
    assert "time/device" not in run.keys() and len(run.series("time")[0]) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_events(logdir):
    run = run_with(None, logdir, steps=8, device="cuda")
    steps, dev = run.series("time/device")
    assert list(steps) == list(range(8)) and all(v > 0 for v in dev)
