"""A large finished log is read without building its records (``cockpit_lite/runlog/scan.py``):
every reader method must answer exactly as a run that builds its records does, before and after
its cache is written, on logs with out-of-order and repeated steps, amendments that add, replace
or only flag, and changing key sets."""

import json
import random

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.runlog import Run, RunLogWriter
from cockpit_lite.runlog.cache import RunCache


@pytest.fixture(autouse=True)
def scan_every_log(monkeypatch):
    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)


def fuzz_log(logdir, seed, steps=60, close=True):
    rng = random.Random(seed)
    keys = ["loss", "grad_norm", "lr", "time", "alpha", "x/a", "x/b"]
    w = RunLogWriter(logdir, {"model": "m"})
    written = []
    for s in range(steps):
        step = s if rng.random() > 0.1 else rng.randrange(0, steps + 5)  # some out of order or repeated
        line = {"type": "step", "step": step}
        if rng.random() < 0.3 and written:
            line["amends"] = True
            line["step"] = rng.choice(written) if rng.random() < 0.8 else steps + 100 + s
        if rng.random() < 0.9:
            chosen = rng.sample(keys, rng.randrange(1, len(keys)))
            line["values"] = {k: rng.choice([rng.random(), float("nan"), float("inf"), None, 3, "Infinity"])
                              if rng.random() < 0.2 else rng.random() for k in chosen}
        if rng.random() < 0.2:
            line["reasons"] = {rng.choice(keys): f"reason {s}"}
        if rng.random() < 0.15:
            line["flags"] = rng.sample(["nonfinite_loss", "late", "odd"], rng.randrange(1, 3))
        if rng.random() < 0.5:
            line["samples"] = rng.choice([128, 64, "many"])
        if rng.random() < 0.4:
            data = {}
            if rng.random() < 0.5:
                data["energy"] = {"steps": rng.choice([1, 2, 5, None]), "cpu": {"j": s}}
            if rng.random() < 0.4:
                data["hess_max_ev"] = {"converged": rng.choice([True, False]), "hvps": s}
            if rng.random() < 0.4:
                data["grad_hist_1d"] = {"counts": [s, step], "edges": [0, 1, 2]}
            line["data"] = data
        w.write(line)
        written.append(line["step"])
    w.write({"type": "event", "level": "info", "message": "x"})
    w.write({"type": "skipped", "step": 7, "reason": "inf"})
    if close:
        w.close({"steps": steps})


def assert_same(run, plain):
    """Every read of ``run`` (read without its records) equals ``plain``'s (records built)."""
    assert run._cached is not None  # nothing below builds the records
    assert len(run) == len(plain)
    np.testing.assert_array_equal(run.steps(), plain.steps())
    assert run.keys() == plain.keys()
    for key in plain.keys() + ["hess_trace"]:
        for a, b in zip(run.series(key), plain.series(key)):
            np.testing.assert_array_equal(a, b)
        assert run.reasons(key) == plain.reasons(key)
        assert list(run.reasons(key)) == list(plain.reasons(key))
    for flag in ("nonfinite_loss", "late", "odd", "never"):
        assert run.flagged(flag) == plain.flagged(flag)
    for name in RunCache.FIELDS:
        for a, b in zip(run.field(name), plain.field(name)):
            np.testing.assert_array_equal(a, b)
    for key, name in RunCache.DATA_FIELDS:
        for a, b in zip(run.data_field(key, name), plain.data_field(key, name)):
            np.testing.assert_array_equal(a, b)
    assert run.data_keys() == plain.data_keys()
    for key in plain.data_keys() + ["never"]:
        assert run.last_data(key) == plain.last_data(key)
    for key in plain.data_keys():
        assert run.data(key) == plain.data(key)
    assert (run.header, run.skipped, run.events, run.footer) == (plain.header, plain.skipped, plain.events, plain.footer)
    assert run._cached is not None
    assert run.records == plain.records  # built now (decoded again from the log)


@pytest.mark.parametrize("seed", range(12))
def test_a_scanned_log_reads_as_one_with_records(tmp_path, seed):
    fuzz_log(tmp_path, seed)
    plain = cockpit_lite.load(tmp_path, cache=False)
    scanned = cockpit_lite.load(tmp_path)
    assert_same(scanned, plain)
    warm = cockpit_lite.load(tmp_path)  # from the cache the scan wrote
    assert warm._offset == plain._offset
    assert_same(warm, plain)


def test_only_a_finished_log_is_scanned(tmp_path, monkeypatch):
    scans = []
    original = Run._add

    def spy(self, record, *where):
        scans.append(self._scan is not None)
        return original(self, record, *where)

    monkeypatch.setattr(Run, "_add", spy)
    fuzz_log(tmp_path / "open", 1, close=False)
    fuzz_log(tmp_path / "closed", 1)
    cockpit_lite.load(tmp_path / "open")
    assert scans and not any(scans)
    scans.clear()
    cockpit_lite.load(tmp_path / "closed")
    assert any(scans)
    scans.clear()
    monkeypatch.setattr(RunCache, "MIN_BYTES", 1 << 30)
    (tmp_path / "closed" / ".cockpit.jsonl.cache").unlink()
    cockpit_lite.load(tmp_path / "closed")  # small logs build their records
    assert scans and not any(scans)


def test_a_scanned_log_keeps_its_cache_when_lines_are_appended(tmp_path):
    """A closed log that is appended to (a resumed run) is read from the scan's cache plus the new lines."""
    fuzz_log(tmp_path, 3)
    cockpit_lite.load(tmp_path)
    with open(tmp_path / "cockpit.jsonl", "a") as fh:
        fh.write(json.dumps({"type": "step", "step": 500, "values": {"loss": 0.5},
                             "data": {"grad_hist_1d": {"counts": [1]}}}) + "\n")
        fh.write(json.dumps({"type": "step", "step": 3, "amends": True, "values": {"loss": 9.0}}) + "\n")
    run = cockpit_lite.load(tmp_path)
    plain = cockpit_lite.load(tmp_path, cache=False)
    assert run.records == plain.records
    for key in plain.keys():
        for a, b in zip(run.series(key), plain.series(key)):
            np.testing.assert_array_equal(a, b)
    assert run.data("grad_hist_1d") == plain.data("grad_hist_1d")
    again = cockpit_lite.load(tmp_path)
    assert again.data("grad_hist_1d") == plain.data("grad_hist_1d") and again.records == plain.records


def test_a_corrupt_line_in_a_scanned_log_names_its_line(tmp_path):
    fuzz_log(tmp_path, 2)
    lines = (tmp_path / "cockpit.jsonl").read_bytes().split(b"\n")
    lines[5] = b'{"type": "step", "step": 3, "values": {'
    (tmp_path / "cockpit.jsonl").write_bytes(b"\n".join(lines))
    with pytest.raises(cockpit_lite.runlog.CorruptLogError, match="line 6"):
        cockpit_lite.load(tmp_path, strict=True)
    with pytest.warns(RuntimeWarning, match="line 6"):
        assert [n for n, _ in cockpit_lite.load(tmp_path).bad_lines] == [6]


def test_a_value_that_is_no_number_costs_its_line_in_a_scanned_log(tmp_path):
    """A value that is no number (a dict) is a bad line, in the scan as in the plain reader."""
    w = RunLogWriter(tmp_path, {"model": "m"})
    w.write({"type": "step", "step": 0, "values": {"loss": 1.0, "odd": {"a": 1}}})
    w.write({"type": "step", "step": 1, "values": {"loss": 2.0}})
    w.close({})
    for cache in (True, False):
        with pytest.warns(RuntimeWarning, match="line 2: value of 'odd' is"):
            run = cockpit_lite.load(tmp_path, cache=cache)
        assert run.series("loss")[0].tolist() == [1] and [n for n, _ in run.bad_lines] == [2]
