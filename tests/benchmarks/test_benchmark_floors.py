"""benchmarks/floors.py: the floors timed beside issue 21's rows in the same run. What is checked here is
what they do (which work, on which steps) and how the report reads them; the timing is the runner's job."""

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import floors, problems, report, suite, variants  # noqa: E402


def test_schedule_floor_counts_on_the_per_sample_steps_only(monkeypatch):
    floor = floors.ScheduleFloor(problems.make("cnn", batch_size=4), "sgd", count_every=10)
    model = floor.model
    linears = {id(m.weight) for m in model.modules() if m.__class__.__name__ == "Linear"}
    convs = [p for n, p in model.named_parameters() if id(p) not in linears]
    # the conv parameters (and the Linear biases) are counted, the Linear weights on [b, in] inputs are not
    assert sorted(b.shape for b in floor.blocks) == sorted((4, *p.shape) for p in convs)
    calls = []
    monkeypatch.setattr(floor, "_histc", lambda X, R, bins: calls.append(X.shape))
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(12):
        floor()
    assert len(calls) == 2 * len(floor.blocks)  # steps 0 and 10
    assert any((p - q).abs().max() > 0 for p, q in zip(model.parameters(), before))  # it trains
    floor.close()


def test_sequence_linear_weights_are_counted():
    floor = floors.ScheduleFloor(problems.get("transformer"), "sgd", count_every=10)
    head = floor.model.head.weight  # mean-pooled: [b, in], left out
    counted = {b.shape[1:] for b in floor.blocks}
    assert floor.model.encoder[0].linear1.weight.shape in counted and len(floor.blocks) == len(floor.params) - 1
    assert head.shape not in counted


def test_floor_column_says_whether_the_target_is_within_reach():
    row = {"target": 1.2, "ratio": 1.8}
    assert report._floor(dict(row, floor_ratio=1.5)).startswith("1.50x: out of reach (floor misses by 0.30x)")
    assert report._floor(dict(row, floor_ratio=1.1)) == "1.10x: 0.70x above the floor"
    assert report._floor(dict(row)) == "-"


def test_suite_times_the_floor_beside_an_issue_21_row(tmp_path):
    small = dataclasses.replace(problems.make("cnn", batch_size=4), name="cnn")
    name = floors.SCHEDULED
    specs = {name: variants.scheduled()[name]}
    (row,) = suite.measure(small, "sgd", specs, rounds=1, steps=10, tmp=str(tmp_path))
    assert row["target_issue"] == "21" and row["floor_ratio"] > 0
    assert "| cnn | sgd | economy (default schedules) |" in report.targets_table([row])


def test_the_floor_does_the_work_it_claims(monkeypatch):
    """Weight gradients on the per-sample step, alpha's end-point projections on the next one, per conv layer;
    and both products are the right ones (per-sample autograd on a small conv and a sequence Linear)."""
    import torch
    from torch import nn

    seen = {"grad": 0, "proj": 0}
    wg, pr = floors._weight_grad, floors._projection
    monkeypatch.setattr(floors, "_weight_grad", lambda *a: (seen.__setitem__("grad", seen["grad"] + 1), wg(*a))[1])
    monkeypatch.setattr(floors, "_projection", lambda *a: (seen.__setitem__("proj", seen["proj"] + 1), pr(*a))[1])
    floor = floors.ScheduleFloor(problems.make("cnn", batch_size=4), "sgd", count_every=10)
    floor()
    assert seen == {"grad": 3, "proj": 0}
    floor()
    assert seen == {"grad": 3, "proj": 3}
    floor()
    assert seen == {"grad": 3, "proj": 3}
    torch.manual_seed(0)
    for m, x in ((nn.Conv2d(2, 3, 3, padding=1).double(), torch.randn(4, 2, 5, 5, dtype=torch.float64)),
                 (nn.Linear(3, 2).double(), torch.randn(4, 6, 3, dtype=torch.float64))):
        out = m(x)
        D = torch.randn_like(out)
        d = torch.randn_like(m.weight)
        per = [torch.autograd.grad((m(x[i:i + 1]) * D[i:i + 1]).sum(), m.weight)[0] for i in range(4)]
        torch.testing.assert_close(floors._projection(m, x, D, d), torch.stack([(g * d).sum() for g in per]))
        torch.testing.assert_close(floors._weight_grad(m, x, D), sum(per))


def test_the_cpu_only_minimal_versions_are_left_out_of_a_gpu_run(monkeypatch):
    assert floors.floor_for("mlp", "noise") is not None
    monkeypatch.setattr(problems, "on_gpu", lambda: True)
    assert floors.floor_for("mlp", "noise") is None
    assert floors.floor_for("cnn", floors.SCHEDULED) is not None  # the schedule floor runs on the device
