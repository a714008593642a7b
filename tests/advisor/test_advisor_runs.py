"""The advisor on real, deliberately broken training runs (examples/broken_runs.py)."""

import os
import sys
import warnings

import pytest

import cockpit_lite
from cockpit_lite.advisor import diagnose, report

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "examples"))
import broken_runs  # noqa: E402


@pytest.mark.parametrize("scenario", list(broken_runs.SCENARIOS))
def test_advisor_names_the_problem(scenario, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broken runs warn about NaNs, dead layers, ...
        logdir = broken_runs.SCENARIOS[scenario](str(tmp_path / scenario))
    run = cockpit_lite.load(logdir)
    found = [d.rule for d in diagnose(run)]
    expected = broken_runs.EXPECTED[scenario]
    if expected is None:
        assert found == [], report(run)
    else:
        assert expected in found, report(run)
        d = [x for x in diagnose(run) if x.rule == expected][0]
        assert d.evidence and d.action and 0 < d.confidence <= 1


def test_live_advisor_warns_once_and_logs(tmp_path):
    from torch import nn
    import torch

    torch.manual_seed(0)
    x, y = broken_runs.digits()
    net = broken_runs.mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    with pytest.warns(RuntimeWarning) as record:
        with cockpit_lite.watch(net, opt, loss_fn=crit, logdir=tmp_path, advisor=True):
            for step in range(30):
                xb = x[:32].clone()
                if step >= 10:
                    xb[0, 0] = float("nan")
                opt.zero_grad()
                crit(net(xb), y[:32]).backward()
                opt.step()
    advice = [str(w.message) for w in record if "advisor" in str(w.message)]
    assert len([a for a in advice if "[divergence]" in a]) == 1  # once, not every step
    run = cockpit_lite.load(tmp_path)
    logged = [e for e in run.events if e.get("level") == "diagnosis"]
    assert logged and logged[0]["diagnosis"]["rule"] == "divergence" and logged[0]["diagnosis"]["step"] == 10
