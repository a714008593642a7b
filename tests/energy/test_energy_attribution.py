"""Attribution of a coarse cumulative energy counter to steps, against a simulated ground truth.

The simulation knows the true power at every instant; the attributor only sees what the sampler
thread would see (counter values read every ``poll`` seconds, changing every ~50 ms, quantised to
mJ; step-end events found complete at the first poll after they completed).
"""

import math
import time

import numpy as np
import pytest

from cockpit_lite.energy.attribution import Boundary, CounterChange, WindowAttributor, bracket
from cockpit_lite.energy.nvml import GpuEnergyMeter
from energy_fakes import FakeEvent, FakeNvml

DT = 1e-4  # the simulation's time grid


class World:
    """True power P(t) on a grid, its integral E(t), a counter that updates every ~period s."""

    def __init__(self, seconds, period=0.05, seed=0):
        rng = np.random.default_rng(seed)
        n = int(seconds / DT) + 1
        t = np.arange(n) * DT
        power = 250 + 120 * np.sin(2 * np.pi * t / 0.37) + 60 * (rng.random(n) > 0.7)  # W, bursty
        self.t = t
        self.energy = np.concatenate([[0.0], np.cumsum(power[:-1] * DT)]) + 1234.5  # J since boot
        updates, u = [], 0.0
        while u < seconds:
            u += period * (0.8 + 0.4 * rng.random())  # jittered update period
            updates.append(u)
        self.updates = np.array(updates)

    def true_energy(self, t):
        return float(np.interp(t, self.t, self.energy))

    def counter(self, t):
        """What NVML returns at time t: E at the last update instant, in whole mJ."""
        k = np.searchsorted(self.updates, t, side="right") - 1
        u = self.updates[k] if k >= 0 else 0.0
        return math.floor(self.true_energy(u) * 1000) / 1000


def sample(world, poll, until, read_s=2e-4):
    """The changes a sampler polling every ``poll`` s records (read takes ``read_s``)."""
    changes, last, last_start = [], None, -math.inf
    s = 0.0
    while s <= until:
        value = world.counter(s + read_s / 2)
        if value != last:
            changes.append(CounterChange(last_start, s + read_s, value))
            last = value
        last_start = s
        s += poll
    return changes


def boundaries(ends, poll, t0=0.0):
    """Boundary brackets as the sampler finds them: between the last poll before and the first after."""
    out = [Boundary(-1, t0, t0)]
    for step, t in enumerate(ends):
        k = math.floor(t / poll)
        out.append(Boundary(step, max(k * poll, t - 1e-9), (k + 1) * poll))
    return out


@pytest.mark.parametrize("seed,step_ms", [(0, 4.0), (1, 11.0), (2, 37.0)])
def test_windows_hold_their_bound_and_steps_sum_to_total(seed, step_ms):
    rng = np.random.default_rng(seed)
    poll, rel = 0.005, 0.05
    durations = rng.uniform(0.5, 1.5, 400) * step_ms * 1e-3
    ends = 0.01 + np.cumsum(durations)
    world = World(ends[-1] + 0.5, seed=seed)
    bounds = boundaries(ends, poll, t0=0.01)
    all_changes = sample(world, poll, ends[-1] + 0.3)
    attributor = WindowAttributor(rel_error=rel)
    attributor.add_boundary(bounds[0])

    results = []
    for b in bounds[1:]:  # online: at each step end the attributor sees the changes seen so far
        now = b.t_hi
        attributor.add_boundary(b)
        visible = [c for c in all_changes if c.t_seen <= now]
        for r in attributor.advance(visible):
            # nothing is attributed before the counter changed after the window's end
            end = bounds[r.window_last_step + 1]
            assert any(c.t_before >= end.t_hi for c in visible)
            results.append(r)
    results += attributor.advance(all_changes, final=True)

    assert [r.step for r in results] == list(range(len(ends)))  # every step once, in order
    per_step = np.array([r.joules for r in results])
    assert math.fsum(per_step) == pytest.approx(attributor.total_j, rel=1e-12, abs=1e-9)
    # the total is the counter's total between the first and last boundary, within the summed bound
    true_total = world.true_energy(ends[-1]) - world.true_energy(0.01)
    assert abs(attributor.total_j - true_total) <= attributor.total_error_j

    windows = {}
    for r in results:
        windows.setdefault((r.window_first_step, r.window_last_step), r)
    assert len(windows) > 1
    for (first, last), r in windows.items():
        true_w = world.true_energy(ends[last]) - world.true_energy(ends[first - 1] if first > 0 else 0.01)
        assert abs(r.window_j - true_w) <= r.window_error_j, (first, last)  # the bound holds
        assert sum(x.joules for x in results if first <= x.step <= last) == pytest.approx(r.window_j, rel=1e-12)
    closed_on_target = [r for k, r in sorted(windows.items())][:-1]
    assert all(r.window_target_met and r.window_error_j <= rel * r.window_j for r in closed_on_target)


def test_bracket_limits_and_estimate():
    changes = [CounterChange(-math.inf, 0.0, 10.0), CounterChange(0.04, 0.05, 15.0), CounterChange(0.09, 0.1, 20.0)]
    br = bracket(changes, Boundary(0, 0.06, 0.07))
    assert (br.lo, br.hi) == (15.0, 20.0)
    assert 15.0 <= br.estimate <= 20.0
    unknown = bracket(changes, Boundary(1, 0.11, 0.12))
    assert unknown.lo == 20.0 and unknown.hi == math.inf and not unknown.known


def test_no_counter_update_after_the_last_step_is_not_reported_as_measured():
    changes = [CounterChange(-math.inf, 0.0, 0.0), CounterChange(0.04, 0.05, 5.0)]
    a = WindowAttributor(rel_error=0.05)
    a.add_boundary(Boundary(-1, 0.0, 0.001))
    a.add_boundary(Boundary(0, 0.06, 0.065))  # after the last change: its upper limit is unknown
    assert a.advance(changes) == []
    (r,) = a.advance(changes, final=True)
    assert r.error_j == math.inf and not r.window_target_met
    assert a.total_j == 0.0  # an unbounded window does not count as measured energy


def test_boundaries_must_be_ordered():
    a = WindowAttributor()
    a.add_boundary(Boundary(-1, 0.0, 0.0))
    a.add_boundary(Boundary(0, 0.1, 0.11))
    with pytest.raises(ValueError):
        a.add_boundary(Boundary(0, 0.2, 0.21))
    with pytest.raises(ValueError):
        WindowAttributor(rel_error=0.0)


class SlowEvent(FakeEvent):
    latency = 0.002


def test_sampler_thread_with_a_coarse_fake_counter():
    FakeEvent.completions = []
    counter = FakeNvml(watts=150.0)
    meter = GpuEnergyMeter(counter, SlowEvent, rel_error=0.1, poll_s=0.002)
    meter.mark(-1)
    results = []
    for step in range(120):
        time.sleep(0.004)
        meter.mark(step)
        results += meter.collect()
    results += meter.finish(timeout_s=1.0)
    assert meter.error is None and meter._thread is None
    assert [r.step for r in results] == list(range(120))
    assert all(math.isfinite(r.error_j) for r in results)
    total = meter.attributor.total_j
    assert math.fsum(r.joules for r in results) == pytest.approx(total, rel=1e-12)
    # the truth: constant power between the completion of the first and the last event
    done = FakeEvent.completions
    true_total = counter.watts * (done[-1] - done[0])
    assert abs(total - true_total) <= meter.attributor.total_error_j
    windows = {(r.window_first_step, r.window_last_step): r for r in results}
    for (first, last), r in windows.items():
        true_w = counter.watts * (done[last + 1] - done[first])
        assert abs(r.window_j - true_w) <= r.window_error_j
