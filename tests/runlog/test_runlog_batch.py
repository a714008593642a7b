"""The run log written in batches (cockpit_lite/runlog/batch.py): what a kill, an exit, a pause, fsync
and other records do to the step records still waiting."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog.batch import LOG_BATCH, MAX_DELAY_S

TRAIN = """
import sys, torch, cockpit_lite
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
crit = nn.CrossEntropyLoss()
cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir={logdir!r}, quantities=["loss", "grad_norm"])
for step in range({steps}):
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt.zero_grad(); crit(model(x), y).backward(); opt.step()
"""


def _file_records(logdir):
    """The log's lines as they are on disk (no flush), and whether any line was bad."""
    lines = (logdir / "cockpit.jsonl").read_bytes().decode().splitlines()
    return [json.loads(line) for line in lines]


def _steps(records):
    return [r["step"] for r in records if r["type"] == "step"]


@pytest.mark.parametrize("steps", [LOG_BATCH + 3, 3 * LOG_BATCH - 1])
def test_sigkill_loses_at_most_one_batch_and_never_corrupts(tmp_path, steps):
    logdir = tmp_path / "killed"
    script = TRAIN.format(logdir=str(logdir), steps=steps) + textwrap.dedent("""
        print("ready", flush=True)
        sys.stdin.readline()  # wait, with records still in the batch, until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    run = cockpit_lite.load(logdir)
    assert not run.finished and not run.bad_lines and not run.torn_tail
    kept = run.steps().tolist()
    assert kept == list(range(len(kept)))  # whole records, in order, none missing in between
    assert steps - LOG_BATCH < len(kept) <= steps


@pytest.mark.parametrize("ending", ["return", "exception"])
def test_exit_without_close_writes_every_waiting_record(tmp_path, ending):
    logdir = tmp_path / "exit"
    script = TRAIN.format(logdir=str(logdir), steps=5)
    if ending == "exception":
        script += "raise SystemExit('the loop failed')\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == (1 if ending == "exception" else 0), proc.stderr
    assert _steps(_file_records(logdir)) == [0, 1, 2, 3, 4]


def _loop(logdir, **options):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=["loss", "grad_norm"], **options)

    def step(skip=False):
        x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        opt.zero_grad()
        crit(model(x), y).backward()
        if not skip:
            opt.step()

    return cockpit, step


def test_a_paused_run_has_its_records_on_disk_within_about_the_delay(tmp_path):
    cockpit, step = _loop(tmp_path)
    try:
        for _ in range(3):
            step()
        deadline = time.monotonic() + MAX_DELAY_S + 5.0  # the flush thread's period, and a loaded machine
        while _steps(_file_records(tmp_path)) != [0, 1, 2]:
            assert time.monotonic() < deadline, _steps(_file_records(tmp_path))
            time.sleep(0.1)
    finally:
        cockpit.close()


def test_fsync_writes_every_record_at_once_and_load_flushes(tmp_path):
    cockpit, step = _loop(tmp_path / "fsync", fsync=True)
    with cockpit:
        step()
        assert _steps(_file_records(tmp_path / "fsync")) == [0]
    cockpit, step = _loop(tmp_path / "batched")
    with cockpit:
        step()
        step()
        assert cockpit.load().steps().tolist() == [0, 1]  # load() writes the waiting records first


def test_other_records_keep_their_order_and_close_writes_all(tmp_path):
    cockpit, step = _loop(tmp_path)
    with cockpit:
        step()
        step()
        step(skip=True)  # recorded as skipped when the next step begins
        step()
        records = _file_records(tmp_path)
        # the skipped record flushed the waiting step records before it
        assert [(r["type"], r.get("step")) for r in records[1:]] == [("step", 0), ("step", 1), ("skipped", 2)]
        for _ in range(LOG_BATCH):
            step()
    records = _file_records(tmp_path)
    assert _steps(records) == [0, 1] + list(range(3, LOG_BATCH + 4)) and records[-1]["type"] == "footer"
