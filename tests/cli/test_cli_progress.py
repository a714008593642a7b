"""Progress lines of ``cockpit-lite plot`` on stderr: only after a couple of seconds, only on a terminal
unless forced (``--progress``), never on stdout."""

from __future__ import annotations

import io

import pytest

from cockpit_lite import progress
from cockpit_lite.cli import main
from cockpit_lite.progress import Progress
from cockpit_lite.testing import write_synthetic_log

pytest.importorskip("matplotlib")


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_nothing_is_printed_for_short_work_then_each_stage():
    clock, out = Clock(), Terminal()
    p = Progress("job", out, clock=clock)
    assert p.enabled  # a terminal
    p.stage("reading")
    clock.t = 1.0
    p.stage("drawing")
    assert out.getvalue() == ""
    clock.t = 2.5
    p.stage("writing")
    clock.t = 3.0
    p.done()
    assert out.getvalue().splitlines() == ["job: [  2.5 s] writing ...", "job: [  3.0 s] done"]


def test_short_work_prints_no_total_and_no_terminal_means_off():
    clock, out = Clock(), Terminal()
    p = Progress("job", out, clock=clock)
    p.stage("a")
    p.done()
    assert out.getvalue() == ""
    plain = io.StringIO()  # not a terminal (a pipe, a log file)
    p = Progress("job", plain, clock=clock)
    clock.t = 10.0
    p.stage("late")
    assert not p.enabled and plain.getvalue() == ""
    forced = Progress("job", plain, enabled=True, clock=clock)
    clock.t = 20.0
    forced.stage("late")
    assert "late ..." in plain.getvalue()


def test_a_broken_stderr_never_fails_the_work():
    stream = io.StringIO()
    stream.close()
    p = Progress("job", stream, enabled=True, after=0)
    p.stage("x")
    p.done()
    assert not p.enabled


def test_plot_with_forced_progress_writes_stages_to_stderr(tmp_path, capsys, monkeypatch):
    write_synthetic_log(tmp_path / "a", 20)
    write_synthetic_log(tmp_path / "b", 10)
    monkeypatch.setattr(progress, "AFTER", 0.0)  # "long" from the start
    out = tmp_path / "x.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out), "--progress", "--one-process"]) == 0
    captured = capsys.readouterr()
    assert out.exists() and captured.out.startswith("wrote ")
    lines = captured.err.splitlines()
    assert all(line.startswith("cockpit-lite plot: [") for line in lines)
    text = "\n".join(lines)
    for stage in ("reading " + str(tmp_path / "a") + " (1/2)", "(2/2)", "choosing the panels", "panels ...",
                  f"writing {out}", "done"):
        assert stage in text, stage
    assert "reading" not in captured.out
    # default: stderr is not a terminal here (captured), so nothing; --no-progress forces off
    for flags in ([], ["--no-progress"]):
        assert main(["plot", str(tmp_path / "a"), "-o", str(out), "--one-process", *flags]) == 0
        assert capsys.readouterr().err == ""
