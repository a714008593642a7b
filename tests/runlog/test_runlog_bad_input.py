"""Hostile and malformed run logs: a bad line costs that line (reported with its number, as a warning
and in the CLI's output), on every read path; files that are not regular files are refused; the
writer never follows a planted link; a typo'd key is a KeyError with suggestions."""

import os
import signal

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite import runlog
from cockpit_lite.runlog import CorruptLogError, Run, RunLogWriter
from cockpit_lite.runlog.cache import RunCache
from cockpit_lite.runlog.files import NotRegularFileError

STEP = '{"type":"step","step":%d,"wall":1.5,"samples":8,"values":{"loss":%s}}'

# one line of each class that must cost only itself (the line stands as line 3 of the log)
BAD_LINES = {
    "not json": '{"type":"step","step":1,#',
    "not an object": "[1, 2, 3]",
    "no type": '{"step": 1, "values": {"loss": 1.0}}',
    "invalid utf-8": b'{"type":"step","step":1,"values":{"loss":"\xff"}}',
    "integer of 400 digits as a value": '{"type":"step","step":1,"values":{"loss":1%s}}' % ("0" * 400),
    "integer over python's digit limit": '{"type":"step","step":1,"values":{"loss":%s}}' % ("7" * 5000),
    "null step": '{"type":"step","step":null,"values":{"loss":1.0}}',
    "string step": '{"type":"step","step":"151","values":{"loss":1.0}}',
    "float step": '{"type":"step","step":1.5,"values":{"loss":1.0}}',
    "boolean step": '{"type":"step","step":true,"values":{"loss":1.0}}',
    "huge step": '{"type":"step","step":%d,"values":{"loss":1.0}}' % 2 ** 70,
    "missing step": '{"type":"step","values":{"loss":1.0}}',
    "deep nesting": '{"type":"step","step":1,"data":{"x":%s%s}}' % ("[" * 100000, "]" * 100000),
    "values not an object": '{"type":"step","step":1,"values":[1.0]}',
    "value an object": '{"type":"step","step":1,"values":{"loss":{"a":1}}}',
    "value a list": '{"type":"step","step":1,"values":{"loss":[1]}}',
    "reasons a list": '{"type":"step","step":1,"values":{"loss":1.0},"reasons":["x"]}',
    "data a number": '{"type":"step","step":1,"values":{"loss":1.0},"data":5}',
    "flags a string": '{"type":"step","step":1,"values":{"loss":1.0},"flags":"nonfinite_loss"}',
    "flags with an object": '{"type":"step","step":1,"values":{"loss":1.0},"flags":[{}]}',
    "skipped with null step": '{"type":"skipped","step":null,"reason":"x"}',
    "skipped with a number as reason": '{"type":"skipped","step":1,"reason":5}',
    "event with a list as message": '{"type":"event","level":"warning","message":["x"]}',
}


def _log(path, line3, extra=()):
    """header, step 0, ``line3``, step 2, ``extra`` lines, footer: written as bytes."""
    w = RunLogWriter(path, {"model": "m"})
    w.close()
    raw = line3 if isinstance(line3, bytes) else line3.encode()
    body = [(STEP % (0, "1.0")).encode(), raw, (STEP % (2, "0.5")).encode(), *extra,
            b'{"type":"footer","steps":3}']
    with open(w.path, "ab") as fh:
        fh.write(b"\n".join(body) + b"\n")
    return w.path


@pytest.fixture(params=["plain", "scan"])
def read_path(request, monkeypatch):
    """Read as a small log (records built) or as a large one (runlog/scan, then its cache)."""
    if request.param == "scan":
        monkeypatch.setattr(RunCache, "MIN_BYTES", 0)
    return request.param


@pytest.mark.parametrize("name", sorted(BAD_LINES))
def test_a_bad_line_costs_that_line(tmp_path, name, read_path):
    path = _log(tmp_path, BAD_LINES[name])
    for attempt in ("first read", "second read (from the cache where written)"):
        with pytest.warns(RuntimeWarning, match=r"line 3: "):
            run = cockpit_lite.load(tmp_path)
        assert [n for n, _ in run.bad_lines] == [3], attempt
        steps, loss = run.series("loss")
        assert steps.tolist() == [0, 2] and loss.tolist() == [1.0, 0.5], attempt
        assert run.steps().tolist() == [0, 2] and run.finished
        assert run.field("samples")[1].tolist() == [8.0, 8.0] and run.skipped == [] and run.events == []
        assert len(run.records) == 2 and run.data_keys() == []
    with pytest.raises(CorruptLogError, match=r"line 3: not a valid record"):
        cockpit_lite.load(path, strict=True, cache=False)


def test_numbers_beyond_float_in_fields_and_structures_are_left_out(tmp_path, read_path):
    """Top-level fields and structure entries are not validated per line; their columns skip what
    no float can hold instead of failing."""
    odd = ('{"type":"step","step":1,"samples":1%s,"values":{"loss":0.75},"data":{"energy":{"steps":1%s}}}'
           % ("0" * 400, "0" * 400))
    _log(tmp_path, odd)
    run = cockpit_lite.load(tmp_path)
    assert run.bad_lines == [] and run.series("loss")[0].tolist() == [0, 1, 2]
    assert run.field("samples")[0].tolist() == [0, 2]
    assert run.data_field("energy", "steps")[0].tolist() == []


def test_header_faults_are_one_clear_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cockpit.jsonl").write_text(
        '{"type":"header","format":"cockpit-lite-log","version":null}\n' + STEP % (0, "1.0") + "\n")
    with pytest.raises(CorruptLogError, match="version is None, not an integer"):
        cockpit_lite.load(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cockpit.jsonl").write_text(STEP % (0, "1.0") + "\n")
    with pytest.raises(CorruptLogError, match="records before the header"):
        cockpit_lite.load(tmp_path / "b")


def test_the_cli_reports_bad_lines_and_still_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from cockpit_lite.cli import main

    extra = [BAD_LINES["huge step"].encode(), BAD_LINES["deep nesting"].encode(), BAD_LINES["value an object"].encode()]
    _log(tmp_path / "run", BAD_LINES["integer of 400 digits as a value"], extra)
    with pytest.warns(RuntimeWarning, match="line 3"):
        assert main(["plot", str(tmp_path / "run"), "-o", str(tmp_path / "out.png"), "--one-process",
                     "--instruments", "performance"]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and (tmp_path / "out.png").exists()
    assert "skipped 4 line(s)" in out and all(f"line {n}:" in out for n in (3, 5, 6, 7))
    with pytest.warns(RuntimeWarning):
        assert main(["summary", str(tmp_path / "run")]) == 0
    assert "line 5:" in capsys.readouterr().out
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cockpit.jsonl").write_text('{"type":"header","format":"cockpit-lite-log","version":null}\n')
    assert main(["plot", str(tmp_path / "bad"), "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "version" in err and "Traceback" not in err


# -- lines too long to read ------------------------------------------------------------------------
def test_a_line_over_the_limit_is_reported_not_read(tmp_path, monkeypatch, read_path):
    monkeypatch.setattr(runlog.reader, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(Run, "READ_BYTES", 256)  # lines cross block ends; the long one spans many
    huge = '{"type":"step","step":1,"values":{"loss":1.0},"pad":"%s"}' % ("x" * 5000)
    _log(tmp_path, huge)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="line 3: a line of 5.* bytes, over the limit of 1000"):
            run = cockpit_lite.load(tmp_path)
        assert run.series("loss")[0].tolist() == [0, 2] and run.finished
    assert cockpit_lite.load(tmp_path, cache=False).records == run.records


def test_an_unterminated_line_over_the_limit_is_a_torn_tail(tmp_path, monkeypatch):
    monkeypatch.setattr(runlog.reader, "MAX_LINE_BYTES", 1000)
    monkeypatch.setattr(Run, "READ_BYTES", 256)
    w = RunLogWriter(tmp_path, {})
    w.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
    with open(w.path, "ab") as fh:
        fh.write(b"\0" * 20000)  # e.g. a file that grows without newlines
    with pytest.warns(RuntimeWarning, match="incomplete"):
        run = cockpit_lite.load(tmp_path)
    assert run.torn_tail and run.steps().tolist() == [0]
    with open(w.path, "ab") as fh:  # and the reader picks up after it once it ends
        fh.write(b"\n" + (STEP % (1, "2.0")).encode() + b"\n")
    with pytest.warns(RuntimeWarning, match="line 3: a line of 20000 bytes"):
        assert run.refresh() == 1
    assert run.steps().tolist() == [0, 1] and not run.torn_tail


def test_reading_in_blocks_gives_the_same_run(tmp_path, monkeypatch):
    w = RunLogWriter(tmp_path, {})
    for s in range(50):
        w.write({"type": "step", "step": s, "values": {"loss": s / 7, "x": "NaN"}, "data": {"d": [s] * s}})
    w.close({"steps": 50})
    whole = cockpit_lite.load(tmp_path, cache=False)
    monkeypatch.setattr(Run, "READ_BYTES", 100)
    blocks = cockpit_lite.load(tmp_path, cache=False)
    assert blocks.records == whole.records and blocks.footer == whole.footer and blocks.bad_lines == []


# -- files that are not regular files --------------------------------------------------------------
def _no_hang(seconds=20):
    def fail(*_):
        raise TimeoutError("the reader hung")
    signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "cockpit.jsonl")
    _no_hang()
    try:
        with pytest.raises(NotRegularFileError, match="FIFO"):
            cockpit_lite.load(tmp_path)
        with pytest.raises(NotRegularFileError, match="FIFO"):
            cockpit_lite.load(tmp_path / "cockpit.jsonl", cache=False)
    finally:
        signal.alarm(0)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_link_to_a_device_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "cockpit.jsonl")
    _no_hang()
    try:
        with pytest.raises(NotRegularFileError, match="character device"):
            cockpit_lite.load(tmp_path)
    finally:
        signal.alarm(0)
    from cockpit_lite.cli import main

    assert main(["summary", str(tmp_path)]) == 2  # a clear one-line error


def test_a_link_to_a_regular_log_is_read(tmp_path):
    w = RunLogWriter(tmp_path / "real", {})
    w.write({"type": "step", "step": 0, "values": {"loss": 1.0}})
    w.close({"steps": 1})
    (tmp_path / "link").mkdir()
    os.symlink(w.path, tmp_path / "link" / "cockpit.jsonl")
    assert len(cockpit_lite.load(tmp_path / "link")) == 1


def test_a_cache_that_is_a_fifo_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)
    _log(tmp_path, STEP % (1, "2.0"))
    os.mkfifo(tmp_path / ".cockpit.jsonl.cache")
    _no_hang()
    try:
        assert cockpit_lite.load(tmp_path).steps().tolist() == [0, 1, 2]
    finally:
        signal.alarm(0)


def test_the_writer_never_follows_a_planted_link(tmp_path):
    target = tmp_path / "elsewhere" / "target.txt"
    target.parent.mkdir()
    (tmp_path / "run").mkdir()
    os.symlink(target, tmp_path / "run" / "cockpit.jsonl")  # dangling: open("ab") would create it
    with pytest.raises(FileExistsError, match="symbolic link"):
        RunLogWriter(tmp_path / "run", {})
    assert not target.exists()
    w = RunLogWriter(tmp_path / "run", {}, if_exists="overwrite")  # replaces the link, not its target
    w.close({"steps": 0})
    assert not target.exists() and not os.path.islink(w.path) and cockpit_lite.load(w.path).finished


# -- keys ----------------------------------------------------------------------------------------
def test_a_typo_key_is_a_key_error_with_suggestions(tmp_path, read_path):
    w = RunLogWriter(tmp_path, {"quantities": {"loss": {}, "my_metric": {}}})
    for s in range(3):
        w.write({"type": "step", "step": s, "values": {"loss": 1.0, "grad_norm": float("nan")}})
    w.close({"steps": 3})
    run = cockpit_lite.load(tmp_path)
    with pytest.raises(KeyError, match="did you mean 'grad_norm'"):
        run.series("grad_nrom")
    with pytest.raises(KeyError, match="'loss'"):
        run.series("zzz")
    # a known quantity without values, a NaN one, a part of one: as before
    for key in ("alpha", "hess_trace/stderr", "my_metric", "grad_norm/fc.weight"):
        steps, values = run.series(key)
        assert steps.size == 0 and values.dtype == np.float64
    assert np.isnan(run.series("grad_norm")[1]).all()
