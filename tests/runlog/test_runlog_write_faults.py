"""A failing log write (a full disk: OSError 28, partial writes included) never reaches the training
loop, never corrupts the log, and is counted; checked with a file object that fails on demand."""

import errno
import json
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter
from cockpit_lite.runlog.batch import LOG_BATCH


class FailingFile:
    """Wraps the writer's raw file: while ``failing``, a write puts at most ``partial`` bytes into
    the file (as a disk filling up does) and the next write raises ENOSPC."""

    def __init__(self, fh, partial=7):
        self.fh, self.partial, self.failing, self.calls, self._owed = fh, partial, False, 0, False

    def write(self, data):
        self.calls += 1
        if not self.failing:
            return self.fh.write(data)
        if self._owed or not self.partial:
            self._owed = False
            raise OSError(errno.ENOSPC, "No space left on device")
        self._owed = True
        return self.fh.write(bytes(data[:self.partial]))

    def fileno(self):
        return self.fh.fileno()

    def close(self):
        self.fh.close()


def _lines(path):
    return [json.loads(line) for line in path.read_bytes().decode().splitlines()]


@pytest.mark.parametrize("partial", [0, 7])
def test_a_full_disk_keeps_the_log_valid_and_retries(tmp_path, partial):
    w = RunLogWriter(tmp_path, {"model": "m"})
    w._fh = disk = FailingFile(w._fh, partial)
    w.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
    disk.failing = True
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        assert w.write({"type": "step", "step": 1, "values": {"loss": 0.5}}) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert w.write({"type": "step", "step": 2, "values": {"loss": 0.25}}) is False
    # the log holds whole lines only while the disk is full (the partial bytes were cut off)
    assert [r.get("step") for r in _lines(w.path)] == [None, 0]
    disk.failing = False
    assert w.write({"type": "step", "step": 3, "values": {"loss": 0.125}})
    w.close({"steps": 4})
    records = _lines(w.path)  # standard JSON, one record per line
    assert [r.get("step") for r in records if r["type"] == "step"] == [0, 1, 2, 3]
    assert records[-1]["type"] == "footer" and records[-1]["write_failures"] >= 2
    assert records[-1]["dropped_records"] == 0
    run = cockpit_lite.load(tmp_path)
    assert run.series("loss")[0].tolist() == [0, 1, 2, 3] and run.finished


def test_records_beyond_the_retry_limit_are_dropped_and_counted(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLogWriter, "MAX_PENDING_BYTES", 200)
    w = RunLogWriter(tmp_path, {"model": "m"})
    w._fh = disk = FailingFile(w._fh, partial=3)
    disk.failing = True
    with pytest.warns(RuntimeWarning):
        for s in range(20):
            w.write({"type": "step", "step": s, "values": {"loss": float(s)}})
    disk.failing = False
    w.write({"type": "step", "step": 20, "values": {"loss": 20.0}})
    with pytest.warns(RuntimeWarning, match="could not be written"):
        w.close({"steps": 21})
    run = cockpit_lite.load(tmp_path)
    steps = run.steps().tolist()
    assert steps[-1] == 20 and steps == sorted(steps)
    assert run.footer["dropped_records"] == w.dropped == 21 - len(steps) > 0


def test_a_disk_that_stays_full_still_closes_without_raising(tmp_path):
    w = RunLogWriter(tmp_path, {"model": "m"})
    w._fh = disk = FailingFile(w._fh, partial=5)
    disk.failing = True
    with pytest.warns(RuntimeWarning):
        w.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
        w.close({"steps": 1})  # the footer cannot be written either: counted, not raised
    assert w.closed and w.dropped == 2
    run = cockpit_lite.load(tmp_path)  # the header only, whole
    assert run.header["model"] == "m" and len(run) == 0 and not run.torn_tail


def test_a_torn_line_that_cannot_be_cut_off_costs_only_itself(tmp_path, monkeypatch):
    import os

    w = RunLogWriter(tmp_path, {"model": "m"})
    w._fh = disk = FailingFile(w._fh, partial=9)
    monkeypatch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EROFS, "no")))
    disk.failing = True
    with pytest.warns(RuntimeWarning):
        w.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
    disk.failing = False
    w.write({"type": "step", "step": 1, "values": {"loss": 0.5}})
    w.close({"steps": 2})
    with pytest.warns(RuntimeWarning, match="line 2"):
        run = cockpit_lite.load(tmp_path)
    assert run.steps().tolist() == [0, 1] and run.finished
    assert [n for n, _ in run.bad_lines] == [2]


def test_training_goes_on_through_a_full_disk(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path, quantities=["loss", "grad_norm"])
    log = cockpit._writer.writer  # the RunLogWriter under the batching (runlog/batch.py)
    disk = log._fh = FailingFile(log._fh, partial=11)
    n = 3 * LOG_BATCH  # the disk is full while two batches are written
    with pytest.warns(RuntimeWarning, match="No space left"):
        for step in range(n):
            disk.failing = 4 <= step < 2 * LOG_BATCH + 4
            x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()  # never raises
    cockpit.close()  # nor does close
    run = cockpit_lite.load(tmp_path)
    assert run.steps().tolist() == list(range(n))  # kept while the disk was full, written after
    assert run.skipped == []  # a failed write is not a skipped step
    assert run.footer["write_failures"] >= 1 and run.footer["dropped_records"] == 0
