"""The cockpit's DDP guard (cockpit_lite/distributed/group.py) without processes: a fake communicator plays
the other processes, so the check rows, payload sums, the out-of-step detection and the closing's
retry are tested in milliseconds; means_and_vars against float64 statistics of the concatenated shards."""

from __future__ import annotations

import math

import pytest
import torch

from cockpit_lite.distributed import means_and_vars
from cockpit_lite.distributed.group import HEAD, Group, OutOfStep


class FakeDist:
    """The other processes' rows for each all-gather, from ``others(row) -> [rows]`` (this process is rank 0)."""

    def __init__(self, others):
        self.others, self.calls = others, 0

    def all_gather_single(self, out, row, group=None):
        self.calls += 1
        rows = [row] + [torch.as_tensor(r, dtype=torch.float64) for r in self.others(row.clone())]
        out.copy_(torch.cat(rows))


def group_of(others, size=2) -> Group:
    g = Group.__new__(Group)  # no torch.distributed: the fake plays the communicator
    g._dist, g.rank, g.size, g.group, g.device = FakeDist(others), 0, size, object(), torch.device("cpu")
    g._phase, g._index, g._broken, g._place, g.lowest_place = ("", ""), 0, None, 0, 0
    return g


def same_with_payload(payload):
    """Another process at the same point, contributing ``payload``."""
    def others(row):
        row[HEAD:HEAD + len(payload)] = torch.tensor(payload, dtype=torch.float64)
        return [row]
    return others


def test_a_small_sum_is_one_collective_with_its_check():
    g = group_of(same_with_payload([10.0, 20.0, 30.0]))
    g.enter(3, "q.before_step", 1)
    got = g.sum_(torch.tensor([1.0, 2.0, 3.0]))
    assert got.tolist() == [11.0, 22.0, 33.0] and got.dtype == torch.float32
    assert g.max_(torch.tensor([50.0, 0.0, 40.0])).tolist() == [50.0, 20.0, 40.0]
    assert g._dist.calls == 2


def test_a_large_sum_is_a_check_then_an_all_reduce():
    g = group_of(lambda row: [row])
    reduced = []
    g._dist.ReduceOp = type("Op", (), {"SUM": "sum", "MAX": "max"})
    g._dist.all_reduce = lambda buf, op, group: (reduced.append(op), buf.mul_(2))
    g.enter(0, "q.before_step", 1)
    x = torch.arange(g.slots + 1, dtype=torch.float64)
    assert torch.equal(g.sum_(x.clone()), 2 * x) and reduced == ["sum"] and g._dist.calls == 1


@pytest.mark.parametrize("field", [0, 1])  # another tag (another reduction), another size
def test_a_process_elsewhere_is_out_of_step_everywhere_after(field):
    def elsewhere(row):
        row[field] += 1
        row[3] = 1  # it is at the first quantity of the hook; this one at the third
        return [row]
    g = group_of(elsewhere)
    g.enter(5, "q.before_step", 3)
    with pytest.raises(OutOfStep, match="out of step at step 5"):
        g.sum_(torch.tensor([1.0]))
    assert g.broken and g.lowest_place == 1
    calls = g._dist.calls
    with pytest.raises(OutOfStep):  # the step's remaining reductions: no collective at all
        g.sum_(torch.tensor([1.0]))
    with pytest.raises(OutOfStep):
        g.end(False)
    assert g._dist.calls == calls
    g.enter(6, "q.before_step", 1)  # the next step starts matched again
    assert not g.broken


def test_the_closing_check_is_made_out_of_step_and_retried_once_where_all_meet():
    answers = iter([lambda row: [row + 1], same_with_payload([1.0, 4.0])])  # elsewhere first, then here
    g = group_of(lambda row: next(answers)(row))
    g.enter(2, "before_step:close", 4)
    totals = g.close(torch.tensor([1.0, 2.0]))
    assert totals.tolist() == [2.0, 6.0] and g._dist.calls == 2 and g.broken
    g2 = group_of(same_with_payload([1.0, 4.0]))
    g2.enter(2, "a.before_step", 1)
    g2._broken = "went out of step earlier in the hook"
    g2.enter(2, "before_step:close", 4)
    assert g2.close(torch.tensor([1.0, 2.0])).tolist() == [2.0, 6.0] and g2._dist.calls == 1


def test_means_and_vars_equal_those_of_the_concatenated_shards():
    torch.manual_seed(0)
    shards = [torch.randn(5, dtype=torch.float64) * 3 + 100, torch.randn(11, dtype=torch.float64) - 7,
              torch.randn(0, dtype=torch.float64), torch.randn(2, dtype=torch.float64)]
    other = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64) * 1e-3,
             torch.randn(4, dtype=torch.float64), torch.randn(9, dtype=torch.float64)]
    mine = [torch.randn(3, dtype=torch.float64), torch.randn(1, dtype=torch.float64)]
    theirs = [torch.cat(shards), torch.cat(other)]

    def others(row):  # three more processes: each holds its shards of the two statistics
        rows = []
        for a, b in zip(shards[1:], other[1:]):
            r = row.clone()
            stats = []
            for x in (a, b):
                m = x.mean() if x.numel() else torch.zeros((), dtype=torch.float64)
                stats += [float(x.numel()), float(m), float(((x - m) ** 2).sum())]
            r[HEAD:HEAD + 6] = torch.tensor(stats, dtype=torch.float64)
            rows.append(r)
        return rows

    g = group_of(others, size=4)
    g.enter(0, "alpha.before_step", 1)
    got = means_and_vars(g, [torch.cat([mine[0], shards[0]]), torch.cat([mine[1], other[0]])])
    for (n, mean, var), first, x in zip(got, mine, theirs):
        full = torch.cat([first, x])  # this process's values come first (rank 0)
        assert n == full.numel()
        assert math.isclose(float(mean), float(full.mean()), rel_tol=1e-12)
        assert math.isclose(float(var), float(full.var()), rel_tol=1e-10)
    assert g._dist.calls == 1


def test_declared_sums_beyond_one_check_follow_in_further_checks():
    def others(row):  # the other process contributes 1 for every number it carries
        row[HEAD:HEAD + int(row[1])] = 1.0  # (clipped to the row: a first check carries at most slots)
        return [row]
    g = group_of(others)
    g.enter(1, "before_step:close", 2)
    payload = torch.arange(g.slots + 5, dtype=torch.float64)
    rows = []
    g._dist.all_gather_single = (lambda f: lambda out, row, group=None: (rows.append(row.clone()), f(out, row)))(
        g._dist.all_gather_single)
    totals = g.close(payload)
    assert torch.equal(totals, payload + 1) and g._dist.calls == 2
    assert [int(r[1]) for r in rows] == [g.slots + 5, 5]  # sizes announced: the whole, then the rest


def test_a_released_group_makes_no_closing_check():
    g = group_of(lambda row: [row])
    g.group = None  # what release() leaves: a collective now would go to the default group
    g._broken = "the cockpit was closed; its process group is released"
    g.enter(g._phase[0], "before_step:close", 1)
    with pytest.raises(OutOfStep, match="closed"):
        g.close(torch.tensor([1.0]))
    assert g._dist.calls == 0
