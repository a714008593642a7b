"""The cockpit's collectives per tracked step of a two-process DDP run (gloo, CPU), counted by wrapping
torch.distributed in the workers (tests/ddp_count_worker.py). Before checks carried small payloads and
the per-quantity end announcements were folded into one closing per hook, the per-sample set (economy,
every step) made 34-39 collectives per tracked step (37.3 on average: 16 headers, 16 payloads, 7 ends)
and the default set 3 (docs/distributed.md)."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import wait_for_processes
from layout import TESTS

WORKER = str(TESTS / "ddp_count_worker.py")
# upper bounds per tracked step (measured: economy 11 on the step of the per-sample self-check, 9 after;
# default 1: the loss's sums ride in the closing check): each well under what the old scheme made
BOUNDS = {"economy": 11, "default": 1}


def _count(tmp_path, preset: str):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    logdir = tmp_path / preset
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), "2", str(tmp_path / f"init-{preset}"), str(logdir),
                               preset], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    wait_for_processes(procs, "a DDP count worker", 120)
    with open(logdir / "collectives.json") as f:
        log = json.load(f)
    per_step = collections.defaultdict(list)
    for step, phase, kind, what in log:
        per_step[step].append((phase, kind, what))
    return per_step


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("preset", ["economy", "default"])
def test_collectives_per_tracked_step_stay_under_the_bound(tmp_path, preset):
    per_step = _count(tmp_path, preset)
    assert sorted(per_step) == [0, 1, 2], sorted(per_step, key=str)  # every collective belongs to a step
    for step, calls in per_step.items():
        assert len(calls) <= BOUNDS[preset], (step, len(calls), collections.Counter(calls))
        # one closing check per hook that ran a reducing quantity (and the self-check's own end)
        ends = [phase for phase, kind, _ in calls if kind == "end"]
        assert set(ends) <= {"persample_check", "before_step:close", "after_step:close"}, ends
        assert len(ends) == len(set(ends)), ends
        assert "before_step:close" in ends
    if preset == "economy":  # the per-sample set does reduce (loss and grad_hist_1d in the closing check)
        phases = {phase.split(".")[0] for calls in per_step.values() for phase, _, _ in calls}
        assert {"alpha", "norm_test", "persample_check"} <= phases, phases
