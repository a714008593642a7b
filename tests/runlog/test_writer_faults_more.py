"""More faults around the run log (cockpit_lite/runlog/writer.py, batch.py, files.py): a disk full from the
first write (the header is never dropped), a logdir removed while the run writes it, a forked child that
trains with its parent's writer, and a logdir that is a file or a link that points nowhere."""

import builtins
import glob
import json
import os
import shutil
import signal
import threading
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter
from cockpit_lite.runlog import writer as writer_module
from cockpit_lite.runlog.batch import LOG_BATCH, BatchedWriter
from cockpit_lite.runlog.files import IF_EXISTS
from test_runlog_write_faults import FailingFile, _lines


def _step(s):
    return {"type": "step", "step": s, "values": {"loss": float(s)}}


def test_a_disk_full_from_the_first_write_never_drops_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(RunLogWriter, "MAX_PENDING_BYTES", 200)
    disks = []

    def full_disk_open(*args, **kwargs):  # the log's file, full from its first write (the header's)
        disk = FailingFile(builtins.open(*args, **kwargs), partial=5)
        disk.failing = True
        disks.append(disk)
        return disk

    monkeypatch.setattr(writer_module, "open", full_disk_open, raising=False)
    with pytest.warns(RuntimeWarning, match="No space left on device"):
        w = RunLogWriter(tmp_path, {"model": "m"})
        for s in range(20):  # far more than 200 bytes: the oldest kept records are dropped
            assert w.write(_step(s)) is False
    assert w.dropped > 0
    disks[0].failing = False
    assert w.write(_step(20))
    with pytest.warns(RuntimeWarning, match="could not be written"):
        w.close({"steps": 21})
    records = _lines(w.path)
    assert records[0]["type"] == "header" and [r["type"] for r in records].count("header") == 1
    run = cockpit_lite.load(tmp_path)  # the old code dropped the header first: "records before the header"
    steps = run.steps().tolist()
    assert run.header["model"] == "m" and steps[-1] == 20 and steps == sorted(steps)
    assert run.footer["dropped_records"] == w.dropped == 21 - len(steps) > 0


def test_a_removed_logdir_is_created_again_with_the_header(tmp_path):
    logdir = tmp_path / "run"
    w = RunLogWriter(logdir, {"model": "m"})
    for s in range(3):
        w.write(_step(s))
    shutil.rmtree(logdir)  # a cleanup job, rm -rf runs/
    with pytest.warns(RuntimeWarning, match=f"{w.path} was removed.*created again.*3 record"):
        assert w.write_encoded([w.encode(_step(3)), w.encode(_step(4))])  # one batch
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert w.write(_step(5))
    with pytest.warns(RuntimeWarning, match="3 record"):
        w.close({"steps": 6})
    records = _lines(logdir / "cockpit.jsonl")
    assert [r["type"] for r in records] == ["header", "step", "step", "step", "footer"]
    run = cockpit_lite.load(logdir)
    assert run.header["model"] == "m" and run.steps().tolist() == [3, 4, 5] and run.finished
    assert run.footer["dropped_records"] == w.dropped == 3  # the records removed with the old file


def test_a_removed_relative_logdir_is_created_again_where_it_was(tmp_path, monkeypatch):
    """A relative logdir, and the process changes its folder mid-run (os.chdir): the log and the TensorBoard
    file are made again where they were, not under the new folder."""
    pytest.importorskip("tensorboard")
    from cockpit_lite.tensorboard import TensorBoardSink

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    w, tb = RunLogWriter("run", {"model": "m"}), TensorBoardSink("run")
    w.write(_step(0))
    tb.write({"type": "step", "step": 0, "values": {"loss": 0.0}})
    tb.flush()  # (its thread writes by the file's name: not while rmtree empties the folder)
    monkeypatch.chdir(tmp_path / "elsewhere")
    shutil.rmtree(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="removed"):
        assert w.write(_step(1))
        tb.write({"type": "step", "step": 1, "values": {"loss": 1.0}})
    tb.close()
    with pytest.warns(RuntimeWarning, match="1 record"):
        w.close({"steps": 2})
    assert not (tmp_path / "elsewhere" / "run").exists()
    assert cockpit_lite.load(tmp_path / "run").steps().tolist() == [1]
    assert len(list((tmp_path / "run").glob("events.out.tfevents.*"))) == 1


def test_a_removed_logdir_that_cannot_be_created_again_keeps_the_records_until_it_can(tmp_path):
    logdir = tmp_path / "run"
    w = RunLogWriter(logdir, {"model": "m"})
    w.write(_step(0))
    shutil.rmtree(logdir)
    logdir.write_text("a file where the logdir was")
    with pytest.warns(RuntimeWarning, match=f"{w.path} was removed.*cannot be created again.*is a file, not a folder"):
        assert w.write(_step(1)) is False  # never raises into the loop
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert w.write(_step(2)) is False
    assert logdir.read_text() == "a file where the logdir was"
    logdir.unlink()
    with pytest.warns(RuntimeWarning, match="was removed.*created again"):
        assert w.write(_step(3))
    with pytest.warns(RuntimeWarning, match="1 record"):
        w.close({"steps": 4})
    run = cockpit_lite.load(logdir)
    assert run.steps().tolist() == [1, 2, 3] and run.footer["dropped_records"] == 1


def _tensorboard_losses(logdir):
    """{step: cockpit/loss} over the event files in ``logdir``, and the tags seen."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    steps, tags = {}, set()
    for path in glob.glob(str(logdir / "events.out.tfevents.*")):
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                tags.add(value.tag)
                if value.tag == "cockpit/loss":  # migrated by the loader from simple_value to a tensor
                    steps[event.step] = float(tensor_util.make_ndarray(value.tensor))
    return steps, tags


@pytest.mark.parametrize("tensorboard", [False, True])
def test_a_removed_logdir_during_training_is_noticed_at_the_next_batch(tmp_path, tensorboard):
    """With ``tensorboard=True`` the sink notices at its next record (its writer's thread used to fail on the
    missing file, and TensorBoard got nothing more): a new event file holds every record from there on."""
    if tensorboard:
        pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["loss"],
                                 tensorboard=tensorboard)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            crit(model(torch.randn(8, 4)), torch.randint(0, 2, (8,))).backward()
            opt.step()

    steps(3)
    cockpit.flush()
    shutil.rmtree(tmp_path / "run")
    with pytest.warns(RuntimeWarning, match="was removed"):
        steps(LOG_BATCH + 2)  # one batch written (the removal noticed there), two records waiting
        cockpit.close()
    run = cockpit_lite.load(tmp_path / "run")
    assert run.steps().tolist() == list(range(3, LOG_BATCH + 5)) and run.finished
    assert run.footer["dropped_records"] == 3
    if tensorboard:
        seen, tags = _tensorboard_losses(tmp_path / "run")
        assert len(glob.glob(str(tmp_path / "run" / "events.out.tfevents.*"))) == 1 and "meta" in tags
        assert sorted(seen) == run.steps().tolist()
        for step, loss in zip(*run.series("loss")):
            assert seen[int(step)] == pytest.approx(float(loss), rel=1e-6)


def test_a_forked_child_writes_nothing_into_the_parents_log(tmp_path):
    w = BatchedWriter(RunLogWriter(tmp_path, {"model": "m"}))
    for s in range(3):
        w.write(_step(s))  # waiting for their batch when the process forks
    held, release = threading.Event(), threading.Event()

    def flush_thread():  # holds the batch's lock while the process forks, as the parent's flush thread may
        with w._lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=flush_thread)
    holder.start()
    assert held.wait(30)
    pid = os.fork()  # the child's copy of the lock stays held: it must never wait for it
    if pid == 0:  # the child: trains a copy with the inherited writer (and its waiting records)
        code = 1
        try:
            signal.alarm(5)  # a child stuck on the inherited lock dies instead of hanging the test
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                wrote = [w.write(_step(s)) for s in range(2 * LOG_BATCH)]
                w.flush()
                w.close({"steps": 2 * LOG_BATCH})
            said = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
            code = 0 if not any(wrote) and len(said) == 1 and "must open its own logdir" in said[0] else 2
        finally:
            os._exit(code)
    release.set()
    holder.join(30)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for s in range(3, 6):
        w.write(_step(s))
    w.close({"steps": 6})
    raw = [json.loads(line) for line in (tmp_path / "cockpit.jsonl").read_text().splitlines()]
    assert [r.get("step") for r in raw if r["type"] == "step"] == [0, 1, 2, 3, 4, 5]
    assert [r["type"] for r in raw].count("footer") == 1 and raw[-1] == {"type": "footer", "steps": 6}


@pytest.mark.parametrize("if_exists", IF_EXISTS)
def test_a_logdir_that_is_a_file_or_a_dangling_link_gets_a_clear_error_at_watch(tmp_path, if_exists):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    a_file = tmp_path / "exp1"
    a_file.write_text("not a folder")
    with pytest.raises(FileExistsError, match="exp1 exists and is a file, not a folder.*must be a folder"):
        cockpit_lite.watch(model, opt, loss_fn=nn.MSELoss(), logdir=a_file, if_exists=if_exists)
    nowhere = tmp_path / "link"
    nowhere.symlink_to(tmp_path / "target")
    with pytest.raises(FileExistsError, match="link exists and is a symbolic link to .*target.* points nowhere"):
        RunLogWriter(nowhere, {}, if_exists=if_exists)
    assert not os.path.exists(tmp_path / "target")  # a planted link is never followed to create its target
    with pytest.raises(FileExistsError, match="exp1 exists and is a file, not a folder .a folder above the logdir"):
        RunLogWriter(a_file / "sub", {}, if_exists=if_exists)
    assert a_file.read_text() == "not a folder"


def test_increment_passes_over_a_numbered_name_that_is_a_file(tmp_path):
    RunLogWriter(tmp_path / "exp", {}).close({"steps": 0})
    (tmp_path / "exp-2").write_text("not a folder")
    w = RunLogWriter(tmp_path / "exp", {}, if_exists="increment")
    w.close({"steps": 0})
    assert w.logdir == tmp_path / "exp-3" and (tmp_path / "exp-2").read_text() == "not a folder"
