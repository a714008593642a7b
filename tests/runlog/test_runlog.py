"""The run log survives SIGKILL, tolerates a torn last line, refuses corruption, reads growing logs."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import cockpit_lite
from cockpit_lite.runlog import CorruptLogError, RunLogWriter


def test_sigkill_keeps_every_written_step(tmp_path):
    """Killed at some step S >= 40: the log holds steps 0.. without a gap, and at least S - 16 of them (step
    records are written 16 at a time). The child reports each finished step, so the bound holds whatever the
    machine's load (a fixed sleep before the kill made it a race on a busy machine)."""
    logdir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import torch, cockpit_lite
        from torch import nn
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        crit = nn.CrossEntropyLoss()
        cockpit_lite.watch(model, opt, loss_fn=crit, logdir={str(logdir)!r})
        step = 0
        while True:
            x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
            opt.zero_grad(); crit(model(x), y).backward(); opt.step()
            step += 1
            print(step, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        while int(proc.stdout.readline() or 10**9) < 40:
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    done = [int(line) for line in proc.stdout.read().split()]
    proc.stdout.close()
    finished = max([40, *done])  # steps the child finished before the kill
    assert proc.returncode == -signal.SIGKILL
    run = cockpit_lite.load(logdir)
    assert not run.finished
    steps = [r["step"] for r in run]
    assert len(steps) >= finished - 16 and steps == list(range(len(steps))), (finished, len(steps))


def _write_log(path, n=3):
    w = RunLogWriter(path, {"model": "x"})
    for s in range(n):
        w.write({"type": "step", "step": s, "values": {"loss": 1.0 / (s + 1), "bad": float("nan")}})
    return w


def test_torn_last_line_is_accepted_with_warning(tmp_path):
    w = _write_log(tmp_path)
    w.close()
    with open(w.path, "ab") as fh:
        fh.write(b'{"type": "step", "step": 3, "val')
    with pytest.warns(RuntimeWarning, match="incomplete"):
        run = cockpit_lite.load(tmp_path)
    assert run.torn_tail and len(run) == 3
    steps, loss = run.series("loss")
    assert list(steps) == [0, 1, 2] and loss[2] == pytest.approx(1 / 3)
    assert all(v != v for v in run.series("bad")[1])  # NaN survives the round trip


def test_corrupt_line_costs_that_line_with_its_number(tmp_path):
    w = _write_log(tmp_path)
    w.close()
    lines = w.path.read_text().splitlines()
    lines[2] = lines[2][:1] + "#garbage#" + lines[2][1:]
    w.path.write_text("\n".join(lines) + "\n")
    with pytest.warns(RuntimeWarning, match="line 3"):
        run = cockpit_lite.load(tmp_path)
    assert run.steps().tolist() == [0, 2] and [n for n, _ in run.bad_lines] == [3]
    with pytest.raises(CorruptLogError, match="line 3"):
        cockpit_lite.load(tmp_path, strict=True)


def test_file_is_standard_json_and_versioned(tmp_path):
    w = _write_log(tmp_path)
    w.close()
    first, *rest = [json.loads(l) for l in w.path.read_text().splitlines()]
    assert first["format"] == "cockpit-lite-log" and first["version"] == 1
    assert rest[0]["values"]["bad"] == "NaN"
    newer = tmp_path / "newer"
    newer.mkdir()
    (newer / "cockpit.jsonl").write_text(json.dumps({"type": "header", "format": "cockpit-lite-log", "version": 99}) + "\n")
    with pytest.raises(CorruptLogError, match="newer"):
        cockpit_lite.load(newer)


def test_growing_log_and_amendments(tmp_path):
    w = _write_log(tmp_path, n=2)
    run = cockpit_lite.load(tmp_path)
    assert len(run) == 2 and not run.finished
    w.write({"type": "step", "step": 0, "amends": True, "values": {"alpha": 0.25}, "data": {"alpha": {"t": 1.0}}})
    w.write({"type": "step", "step": 2, "values": {"loss": 0.1}})
    # a line being written right now is not yet visible
    os.write(os.open(w.path, os.O_WRONLY | os.O_APPEND), b'{"type":"st')
    with pytest.warns(RuntimeWarning):
        assert run.refresh() == 2
    assert run.series("alpha") [0].tolist() == [0] and run.data("alpha") == [(0, {"t": 1.0})]
    assert run.series("loss")[0].tolist() == [0, 1, 2]
    with open(w.path, "ab") as fh:
        fh.write(b'ep","step":3,"values":{"loss":0.05}}\n')
    assert run.refresh() == 1 and len(run) == 4 and not run.torn_tail
    w.close({"steps": 4})
    run.refresh()
    assert run.finished
