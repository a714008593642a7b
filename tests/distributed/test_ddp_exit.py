"""Issue 24 item 10: a watched two-process DDP run (torch.multiprocessing.spawn, gloo) exits as cleanly as
an unwatched one, the worker returning normally after destroy_process_group() (tests/ddp_exit_worker.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cockpit_lite
from layout import TESTS

WORKER = str(TESTS / "ddp_exit_worker.py")
pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("quantities", ["economy", "full"])
def test_a_watched_ddp_run_exits_normally_every_time(tmp_path, quantities):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i in range(5 if quantities == "economy" else 2):
        logdir = tmp_path / str(i)
        logdir.mkdir()
        p = subprocess.run([sys.executable, WORKER, str(logdir), quantities], env=env, capture_output=True,
                           text=True, timeout=240)
        assert p.returncode == 0, (i, p.returncode, p.stderr[-3000:])
        assert "terminate called" not in p.stderr
        run = cockpit_lite.load(logdir / "log")
        assert run.finished and len(run.steps()) == 4
