"""One writer per log: racing starts on one logdir never mix two runs; re-running a script has explicit
choices (if_exists); the reader refuses a file that holds two runs."""

import json
import multiprocessing as mp
import os

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog import CorruptLogError, RunLogWriter

RACERS = 50


def _race(logdir, if_exists, barrier, results, who):
    barrier.wait()
    try:
        w = RunLogWriter(logdir, {"who": who}, if_exists=if_exists)
    except FileExistsError as err:
        results.put((who, "error", str(err)))
        return
    for s in range(20):
        w.write({"type": "step", "step": s, "values": {"who": float(who)}})
    w.close({"steps": 20})
    results.put((who, "wrote", str(w.logdir)))


def _start_racers(logdir, if_exists):
    ctx = mp.get_context("fork")  # the racers start within microseconds of each other
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(logdir, if_exists, barrier, results, i)) for i in range(RACERS)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    return out


def _one_run(logdir):
    """The writer of the log in ``logdir``, asserting that it holds one whole run of one writer."""
    lines = [json.loads(x) for x in (logdir / "cockpit.jsonl").read_text().splitlines()]
    headers = [r for r in lines if r["type"] == "header"]
    assert len(headers) == 1 and lines[0]["type"] == "header" and lines[-1]["type"] == "footer"
    who = headers[0]["who"]
    steps = [r for r in lines if r["type"] == "step"]
    assert [r["step"] for r in steps] == list(range(20))
    assert all(r["values"]["who"] == who for r in steps)
    return who


@pytest.mark.slow
def test_racing_starts_one_wins_the_others_get_the_clear_error(tmp_path):
    out = _start_racers(tmp_path / "exp", "error")
    winners = [who for who, what, _ in out if what == "wrote"]
    assert len(winners) == 1
    assert all("already holds a run log" in msg and "if_exists" in msg for _, what, msg in out if what == "error")
    assert _one_run(tmp_path / "exp") == winners[0]


@pytest.mark.slow
def test_racing_starts_with_increment_each_get_their_own_folder(tmp_path):
    out = _start_racers(tmp_path / "exp", "increment")
    assert all(what == "wrote" for _, what, _ in out)
    folders = {msg for _, _, msg in out}
    assert len(folders) == RACERS
    assert folders == {str(tmp_path / "exp")} | {str(tmp_path / f"exp-{i}") for i in range(2, RACERS + 1)}
    assert sorted(_one_run(tmp_path / os.path.basename(f)) for f in folders) == list(range(RACERS))


def _train(logdir, **options):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.MSELoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=["loss"], **options) as cockpit:
        for _ in range(3):
            opt.zero_grad()
            crit(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
            opt.step()
    return cockpit


def test_rerunning_a_script_names_the_choices_and_each_works(tmp_path):
    logdir = tmp_path / "exp1"
    _train(logdir)
    with pytest.raises(FileExistsError, match="already holds a run log.*if_exists.*'increment'.*'overwrite'"):
        _train(logdir)
    second = _train(logdir, if_exists="increment")
    assert second.logdir == str(tmp_path / "exp1-2") and len(cockpit_lite.load(second.logdir)) == 3
    third = _train(logdir, if_exists="increment")
    assert third.logdir == str(tmp_path / "exp1-3")
    cockpit_lite.load(logdir)  # writes no cache (small), but an old cache file must go with the log
    (logdir / ".cockpit.jsonl.cache").write_bytes(b"stale")
    before = (logdir / "cockpit.jsonl").read_bytes()
    fourth = _train(logdir, if_exists="overwrite")
    assert fourth.logdir == str(logdir) and (logdir / "cockpit.jsonl").read_bytes() != before
    assert not (logdir / ".cockpit.jsonl.cache").exists()
    assert len(cockpit_lite.load(logdir)) == 3
    with pytest.raises(ValueError, match="if_exists must be one of"):
        _train(tmp_path / "x", if_exists="append")


def test_overwrite_refuses_a_log_that_a_running_writer_holds(tmp_path):
    w = RunLogWriter(tmp_path, {})
    with pytest.raises(FileExistsError, match="being written by a running process"):
        RunLogWriter(tmp_path, {}, if_exists="overwrite")
    w.close({"steps": 0})
    RunLogWriter(tmp_path, {}, if_exists="overwrite").close({"steps": 0})


def test_a_file_holding_two_runs_is_refused_with_the_line(tmp_path):
    a, b = RunLogWriter(tmp_path / "a", {}), RunLogWriter(tmp_path / "b", {})
    for s in range(3):
        a.write({"type": "step", "step": s, "values": {"loss": 1.0}})
        b.write({"type": "step", "step": s, "values": {"loss": 2.0}})
    a.close({"steps": 3})
    b.close({"steps": 3})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(a.path.read_bytes() + b.path.read_bytes())
    with pytest.raises(CorruptLogError, match="line 6: a second header: this file holds two runs"):
        cockpit_lite.load(mixed)
