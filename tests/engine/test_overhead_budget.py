"""The cockpit's share of the step time: computed from the records' own timings, warned once over budget."""

import warnings

import numpy as np
import pytest
import torch

import cockpit_lite
from cockpit_lite.overhead import OverheadSink, check_budget, run_share, share


def _record(step, t, c):
    return {"type": "step", "step": step, "values": {"time": t, "time/cockpit": c}}


def test_share_is_the_ratio_of_sums_over_timed_steps():
    assert share([1.0, 3.0], [0.5, 0.5]) == (0.25, 2)
    ratio, n = share([1.0, float("nan"), 0.0, 2.0], [0.5, 0.1, 0.0, 1.0])
    assert n == 2 and ratio == pytest.approx(0.5)
    assert np.isnan(share([], [])[0])


def test_warns_once_over_budget_and_never_under_it():
    events = []
    sink = OverheadSink(0.5, lambda level, msg, **kw: events.append((level, msg, kw)), preset="full")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sink.write(_record(0, 1.0, 0.99))  # first tracked step: one-off costs, not judged
        for s in range(1, 3):
            sink.write(_record(s, 1.0, 0.1))
        assert not caught and not events
        for s in range(3, 30):
            sink.write(_record(s, 1.0, 0.9))
    over = [w for w in caught if "overhead_budget 50%" in str(w.message)]
    assert len(over) == 1 and "preset 'full'" in str(over[0].message)
    assert len(events) == 1 and events[0][0] == "warning" and events[0][2]["overhead_share"] > 0.5


def test_budget_values_are_checked():
    assert check_budget(None) is None and check_budget(0.25) == 0.25
    for bad in (0, -0.1, 1.5, "x", True):
        with pytest.raises(ValueError, match="overhead_budget"):
            check_budget(bad)


def test_watch_with_a_tiny_budget_warns_once_and_logs_it(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cp = cockpit_lite.watch(model, opt, loss_fn, logdir=tmp_path, quantities="economy", overhead_budget=0.001)
        for _ in range(8):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        cp.close()
    assert len([w for w in caught if "overhead_budget" in str(w.message)]) == 1
    run = cockpit_lite.load(tmp_path)
    whole, recent, n = run_share(run)
    assert n == 7 and 0 < whole <= 1 and 0 < recent <= 1
    # independent of the helper: the ratio of the logged sums
    _, t = run.series("time")
    _, c = run.series("time/cockpit")
    assert whole == pytest.approx(min(1.0, c[1:].sum() / t[1:].sum()))


def test_watch_refuses_a_bad_budget_before_any_log(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="overhead_budget"):
        cockpit_lite.watch(model, opt, torch.nn.MSELoss(), logdir=tmp_path / "w", overhead_budget=2)
    assert not (tmp_path / "w").exists()
