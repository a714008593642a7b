"""The reader's columns and its cache give exactly what a plain decode of the log gives.

The reference is a brute-force reader written here: ``json.loads`` per line, amendments merged
by step, ``decode_number`` per value. Every case compares ``cockpit_lite.load`` (with a cache that
is valid, stale, foreign or corrupt) against it, so a cache can only ever cost time.
"""

import gc
import io
import json
import math
import os
import pickle
import warnings

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.runlog import CorruptLogError, Run, RunLogWriter, decode_number
from cockpit_lite.runlog.cache import RunCache


@pytest.fixture(autouse=True)
def cache_every_log(monkeypatch):
    """Write a cache for logs of any size (the default threshold skips small logs)."""
    monkeypatch.setattr(RunCache, "MIN_BYTES", 0)


def reference(path):
    """Brute force: every line decoded, amendments merged, records in step order."""
    by_step, order = {}, []
    with open(path, "rb") as fh:
        lines = fh.read().split(b"\n")
    for raw in lines[:-1]:  # the last piece is b"" or a torn line
        if not raw.strip():
            continue
        r = json.loads(raw)
        if r["type"] != "step":
            continue
        s = r["step"]
        if s in by_step:
            for part in ("values", "reasons", "data"):
                if part in r:
                    by_step[s].setdefault(part, {}).update(r[part])
            if r.get("flags"):
                by_step[s]["flags"] = sorted(set(by_step[s].get("flags", ())) | set(r["flags"]))
        else:
            by_step[s] = {k: v for k, v in r.items() if k != "amends"}
            order.append(s)
    return [by_step[s] for s in sorted(order)]


def ref_series(records, key, start=None, stop=None):
    pairs = [(r["step"], decode_number(r["values"][key])) for r in records if key in r.get("values", {})
             and (start is None or r["step"] >= start) and (stop is None or r["step"] < stop)]
    return (np.array([p[0] for p in pairs], dtype=np.int64), np.array([p[1] for p in pairs], dtype=np.float64))


def assert_same_as_reference(run, path=None):
    records = reference(path or run.path)
    assert run.records == records
    keys = list(dict.fromkeys(k for r in records for k in r.get("values", {})))
    assert run.keys() == keys
    for key in keys + ["hess_trace"]:
        for start, stop in ((None, None), (3, None), (None, 7), (2, 5), (100, None)):
            s, v = run.series(key, start=start, stop=stop)
            rs, rv = ref_series(records, key, start, stop)
            assert s.dtype == np.int64 and v.dtype == np.float64
            np.testing.assert_array_equal(s, rs)
            np.testing.assert_array_equal(v, rv)  # NaN == NaN here
    np.testing.assert_array_equal(run.steps(), [r["step"] for r in records])


def write_log(logdir, steps=range(12), close=True):
    """Steps with changing key sets, non-finite and integer values, reasons, data, and amendments
    that arrive one step later (alpha) or for a step without a record of its own."""
    w = RunLogWriter(logdir, {"model": "m"})
    for s in steps:
        values = {"loss": 1.0 / (s + 1), "grad_norm": float(s)}
        if s % 3 == 0:
            values["hess_max_ev"] = float("inf") if s == 6 else 2.0 * s
            values["hess_max_ev/hvps"] = 20  # an int stays an int in records, 20.0 in series
        if s == 4:
            values["loss"] = float("nan")
            values["odd"] = None  # not a number: NaN in series, None in records
            values["text"] = "abc"  # likewise
        rec = {"type": "step", "step": s, "values": values}
        if s == 4:
            rec["reasons"] = {"loss": "diverged"}
            rec["flags"] = ["nonfinite_loss"]
        if s % 5 == 0:
            rec["data"] = {"grad_hist_1d": {"edges": [0, 1], "counts": [s]}}
        w.write(rec)
        if s > 0:
            w.write({"type": "step", "step": s - 1, "amends": True, "values": {"alpha": 0.1 * s - 0.5},
                     "data": {"alpha": {"w": [1, 2, 3]}}, **({"flags": ["late"]} if s == 3 else {})})
    if 5 in steps:  # a structure replaced by a later line: the later one counts
        w.write({"type": "step", "step": 5, "amends": True, "data": {"grad_hist_1d": {"edges": [0, 1], "counts": [-5]}}})
    w.write({"type": "step", "step": 1000, "amends": True, "values": {"alpha": -1.0}})  # untracked step
    w.write({"type": "event", "level": "warning", "message": "hello"})
    w.write({"type": "skipped", "step": 99, "reason": "inf grads"})
    if close:
        w.close({"steps": len(steps)})
    return w


def count_decoded(monkeypatch):
    """How many log lines the reader decodes from now on."""
    seen = []
    original = Run._add

    def counting(self, record, *where):
        seen.append(record.get("step"))
        return original(self, record, *where)

    monkeypatch.setattr(Run, "_add", counting)
    return seen


def test_columns_match_a_plain_decode(tmp_path):
    write_log(tmp_path)
    run = cockpit_lite.load(tmp_path, cache=False)
    assert_same_as_reference(run)
    assert run.series("hess_max_ev")[1][2] == math.inf and np.isnan(run.series("odd")[1]).all()
    assert run.records[4]["values"]["odd"] is None and run.records[3]["values"]["hess_max_ev/hvps"] == 20
    s, v = run.series("loss")
    v[:] = 0  # callers get copies: the columns stay intact
    assert np.isnan(run.series("loss")[1][4]) and run.series("loss")[1][0] == 1.0
    assert not (tmp_path / ".cockpit.jsonl.cache").exists()  # cache=False writes nothing


def test_cache_is_written_and_then_used(tmp_path, monkeypatch):
    write_log(tmp_path)
    first = cockpit_lite.load(tmp_path)
    cache = tmp_path / ".cockpit.jsonl.cache"
    assert cache.exists()
    decoded = count_decoded(monkeypatch)
    second = cockpit_lite.load(tmp_path)
    assert decoded == []  # everything came from the cache
    assert_same_as_reference(second)
    assert second.header == first.header and second.footer == first.footer
    assert second.events == first.events and second.skipped == first.skipped and second.finished
    assert second.reasons("loss") == {4: "diverged"} and second.flagged("late") == [2]
    assert second.data("grad_hist_1d") == first.data("grad_hist_1d")


def test_cache_of_a_growing_log_gives_the_new_values(tmp_path, monkeypatch):
    w = write_log(tmp_path, steps=range(8), close=False)
    cockpit_lite.load(tmp_path)  # cache of the first part
    w.write({"type": "step", "step": 7, "amends": True, "values": {"alpha": 7.5, "loss": 9.0}})  # an old step
    for s in range(8, 11):
        w.write({"type": "step", "step": s, "values": {"loss": 2.0 * s, "new_key": -s}})
    w.close({"steps": 11})
    decoded = count_decoded(monkeypatch)
    run = cockpit_lite.load(tmp_path)
    assert decoded == [7, 8, 9, 10, None]  # only the appended lines (the last one the footer)
    assert_same_as_reference(run)
    assert run.series("alpha")[1][-2] == 7.5 and run.series("loss")[1][7] == 9.0
    assert run.series("new_key")[0].tolist() == [8, 9, 10] and run.finished
    decoded.clear()
    again = cockpit_lite.load(tmp_path)  # the refreshed cache (of a finished log now: without the records)
    np.testing.assert_array_equal(again.series("loss")[1], run.series("loss")[1])
    assert decoded == []
    assert_same_as_reference(again)  # the records: decoded from the log


def test_refresh_after_a_cached_load_reads_appended_lines(tmp_path):
    w = write_log(tmp_path, steps=range(5), close=False)
    cockpit_lite.load(tmp_path)
    run = cockpit_lite.load(tmp_path)  # from the cache
    assert run.series("grad_norm")[0].tolist() == [0, 1, 2, 3, 4]
    w.write({"type": "step", "step": 5, "values": {"grad_norm": 50.0}})
    assert run.refresh() == 1
    assert run.series("grad_norm")[1].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 50.0]
    assert_same_as_reference(run)


def test_torn_tail_after_the_cached_part(tmp_path):
    write_log(tmp_path)
    cockpit_lite.load(tmp_path)
    with open(tmp_path / "cockpit.jsonl", "ab") as fh:
        fh.write(b'{"type": "step", "step": 50, "val')
    with pytest.warns(RuntimeWarning, match="incomplete"):
        run = cockpit_lite.load(tmp_path)
    assert run.torn_tail
    assert_same_as_reference(run)
    with open(tmp_path / "cockpit.jsonl", "ab") as fh:  # the writer finishes the line
        fh.write(b'ues": {"loss": 5.0}}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = cockpit_lite.load(tmp_path)
    assert not run.torn_tail and run.series("loss")[0][-1] == 50
    assert_same_as_reference(run)


def test_rewritten_log_of_the_same_size_and_mtime_ignores_the_cache(tmp_path):
    write_log(tmp_path)
    cockpit_lite.load(tmp_path)
    log = tmp_path / "cockpit.jsonl"
    stat = log.stat()
    text = log.read_bytes()
    changed = text.replace(b'"grad_norm":3.0', b'"grad_norm":8.0')
    assert changed != text and len(changed) == len(text)
    log.write_bytes(changed)
    os.utime(log, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # the same size and mtime
    run = cockpit_lite.load(tmp_path)
    assert run.series("grad_norm")[1][3] == 8.0
    assert_same_as_reference(run)


def test_truncated_or_replaced_log_ignores_the_cache(tmp_path):
    write_log(tmp_path)
    cockpit_lite.load(tmp_path)
    log = tmp_path / "cockpit.jsonl"
    lines = log.read_bytes().split(b"\n")
    log.write_bytes(b"\n".join(lines[:6]) + b"\n")  # shorter than the cached part
    assert_same_as_reference(cockpit_lite.load(tmp_path))
    log.unlink()
    write_log(tmp_path, steps=range(20, 23))  # a new run in the same folder
    run = cockpit_lite.load(tmp_path)
    assert run.steps().tolist() == [19, 20, 21, 22, 1000]  # 19: an amendment without a record
    assert_same_as_reference(run)


@pytest.mark.parametrize("content", [b"", b"garbage", RunCache.MAGIC + b"\x80\x04garbage",
                                     RunCache.MAGIC + pickle.dumps({"covered": "x"}),
                                     RunCache.MAGIC + pickle.dumps([1, 2, 3])])
def test_corrupt_cache_is_ignored_and_rewritten(tmp_path, content):
    write_log(tmp_path)
    cache = tmp_path / ".cockpit.jsonl.cache"
    cache.write_bytes(content)
    assert_same_as_reference(cockpit_lite.load(tmp_path))
    assert cache.read_bytes().startswith(RunCache.MAGIC) and cache.read_bytes() != content


class Planted:
    def __reduce__(self):
        return (os.system, ("echo planted > planted.txt",))


def test_a_cache_holding_code_is_refused(tmp_path, monkeypatch):
    write_log(tmp_path)
    cockpit_lite.load(tmp_path)
    cache = tmp_path / ".cockpit.jsonl.cache"
    state = pickle.load(io.BytesIO(cache.read_bytes()[len(RunCache.MAGIC):]))
    state["events"] = [Planted()]
    cache.write_bytes(RunCache.MAGIC + pickle.dumps(state))
    monkeypatch.chdir(tmp_path)
    run = cockpit_lite.load(tmp_path)
    assert not (tmp_path / "planted.txt").exists()
    assert run.events == [{"type": "event", "level": "warning", "message": "hello"}]
    assert_same_as_reference(run)


def test_corrupt_line_after_the_cached_part_names_its_line(tmp_path):
    w = write_log(tmp_path, steps=range(4), close=False)
    cockpit_lite.load(tmp_path)
    n_lines = len((tmp_path / "cockpit.jsonl").read_bytes().splitlines())
    w.write({"type": "step", "step": 4, "values": {"loss": 1.0}})
    with open(tmp_path / "cockpit.jsonl", "ab") as fh:
        fh.write(b"{not json}\n")
    with pytest.raises(CorruptLogError, match=f"line {n_lines + 2}:"):
        cockpit_lite.load(tmp_path, strict=True)
    with pytest.warns(RuntimeWarning, match=f"line {n_lines + 2}:"):
        assert cockpit_lite.load(tmp_path).bad_lines[0][0] == n_lines + 2


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    write_log(tmp_path)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only folder")

    monkeypatch.setattr("tempfile.mkstemp", refuse)
    run = cockpit_lite.load(tmp_path)
    assert_same_as_reference(run)
    assert not (tmp_path / ".cockpit.jsonl.cache").exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "cockpit.jsonl"]  # no temporary file left


def test_small_logs_get_no_cache_and_gc_state_is_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(RunCache, "MIN_BYTES", 8 * 1024 * 1024)
    write_log(tmp_path)
    assert gc.isenabled()
    assert_same_as_reference(cockpit_lite.load(tmp_path))
    assert gc.isenabled()
    assert not (tmp_path / ".cockpit.jsonl.cache").exists()
    gc.disable()
    try:
        cockpit_lite.load(tmp_path)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


def test_synthetic_log_with_every_quantity(tmp_path):
    from cockpit_lite.testing import write_synthetic_log

    write_synthetic_log(tmp_path, 300, hist_every=50, curvature_every=7, energy_every=3)
    cold = cockpit_lite.load(tmp_path)
    warm = cockpit_lite.load(tmp_path)
    assert_same_as_reference(cold)
    assert_same_as_reference(warm)
    assert warm.data("grad_hist_2d") == cold.data("grad_hist_2d") and len(warm.data("energy")) == 100


LINES = [b'{"type":"step","step":1}', b'  {"type":"step","step":1}', b'{"type":"step","step":1}\r',
         b'\xef\xbb\xbf{"type":"step"}', b'{"type":"step"} x', b'{"type":"step"}\x0b', b'{"type":"st\xffep"}',
         b'{"type":"st\xc3\xa9p","v":NaN,"w":-Infinity}', b'{"type":"step"}{"type":"step"}', b'[1, 2]', b'"x"',
         b'{"type":"\xed\xa0\x80"}', b'{"a":1,}', b'{"type": "step", "values": {"x": 1e400}}']


@pytest.mark.parametrize("raw", LINES)
def test_line_decoding_is_json_loads(raw):
    from cockpit_lite.runlog import _decode_line, _text_lines

    texts = _text_lines(raw + b"\n", len(raw) + 1)
    try:
        expected = json.loads(raw)
    except ValueError as err:
        with pytest.raises(type(err)) as got:
            _decode_line(raw, texts[0] if texts else None)
        assert str(got.value) == str(err)
    else:
        got = _decode_line(raw, texts[0] if texts else None)
        assert got == expected or (json.dumps(got) == json.dumps(expected))


def test_odd_lines_in_a_log_read_as_before(tmp_path):
    w = write_log(tmp_path, steps=range(3), close=False)
    with open(w.path, "ab") as fh:
        fh.write(b'  {"type":"step","step":7,"values":{"loss":7.0}}\r\n')
        fh.write('{"type":"step","step":8,"values":{"loss":8.0},"reasons":{"x":"caf\u00e9"}}\n'.encode())
    run = cockpit_lite.load(tmp_path)
    assert run.series("loss")[0].tolist() == [0, 1, 2, 7, 8] and run.reasons("x") == {8: "café"}
    assert_same_as_reference(run)
    with open(w.path, "ab") as fh:
        fh.write(b'{"type":"step","step":9,"values":{"loss":"\xff"}}\n')
    n = len(w.path.read_bytes().splitlines())
    with pytest.raises(CorruptLogError, match=f"line {n}:"):
        cockpit_lite.load(tmp_path, strict=True)


def test_cache_has_the_permissions_of_the_log(tmp_path):
    write_log(tmp_path)
    os.chmod(tmp_path / "cockpit.jsonl", 0o640)
    cockpit_lite.load(tmp_path)
    assert (tmp_path / ".cockpit.jsonl.cache").stat().st_mode & 0o777 == 0o640


def test_a_cached_run_answers_without_building_its_records(tmp_path, monkeypatch):
    """Plotting reads steps, series, reasons, flags, fields and data; none of them builds the
    records of a run read from its cache, and the records built on demand are the plain decode's."""
    from cockpit_lite.runlog.cache import CachedRecords

    w = write_log(tmp_path, close=False)
    w.write({"type": "step", "step": 2000, "samples": 32, "values": {"loss": 0.5}})
    w.close({"steps": 13})
    plain = cockpit_lite.load(tmp_path, cache=False)
    cockpit_lite.load(tmp_path)  # writes the cache
    built = []
    original = CachedRecords.records
    monkeypatch.setattr(CachedRecords, "records", lambda self: built.append(1) or original(self))
    run = cockpit_lite.load(tmp_path)
    assert run._cached is not None and len(run) == len(plain.records)
    np.testing.assert_array_equal(run.steps(), plain.steps())
    assert run.reasons("loss") == plain.reasons("loss") == {4: "diverged"}
    assert run.flagged("late") == plain.flagged("late") == [2] and run.flagged("nonfinite_loss") == [4]
    assert run.data("grad_hist_1d") == plain.data("grad_hist_1d") and run.data("alpha") == plain.data("alpha")
    assert len(run.data("alpha")) == 11 and run.data("alpha")[0] == (0, {"w": [1, 2, 3]})
    assert run.data("never") == [] and run.reasons("never") == {}
    assert run.field("samples")[0].tolist() == [2000] and run.field("samples")[1].tolist() == [32.0]
    assert built == []
    assert_same_as_reference(run)  # iterating the records builds them, once
    assert built == [1] and run._cached is None and run.reasons("loss") == {4: "diverged"}
    for name in ("samples", "step", "absent"):
        for got, expected in zip(run.field(name), plain.field(name)):
            np.testing.assert_array_equal(got, expected)


def test_fields_the_cache_does_not_keep_are_read_from_the_records(tmp_path):
    write_log(tmp_path)
    plain = cockpit_lite.load(tmp_path, cache=False)
    cockpit_lite.load(tmp_path)
    run = cockpit_lite.load(tmp_path)
    assert run.data_field("grad_hist_1d", "counts")[0].size == 0  # a list: not a number
    steps, energy_steps = run.data_field("energy", "steps")  # kept, and absent in this log
    assert steps.size == energy_steps.size == 0 and run._cached is not None
    np.testing.assert_array_equal(run.field("step")[0], plain.steps())  # builds the records
    np.testing.assert_array_equal(run.field("step")[1], plain.steps().astype(float))
    assert run._cached is None


def test_cached_records_that_do_not_read_back_fall_back_to_the_log(tmp_path):
    write_log(tmp_path)
    cockpit_lite.load(tmp_path)
    run = cockpit_lite.load(tmp_path)
    run._cached._records_blob = b"not a pickle"
    assert_same_as_reference(run)


def test_a_cached_structure_is_read_from_its_line_and_a_stale_index_falls_back(tmp_path):
    write_log(tmp_path)
    plain = cockpit_lite.load(tmp_path, cache=False)
    assert dict(plain.data("grad_hist_1d"))[5] == {"edges": [0, 1], "counts": [-5]}  # the amendment's
    assert np.isnan(plain.series("text")[1]).all()
    cockpit_lite.load(tmp_path)
    run = cockpit_lite.load(tmp_path)
    assert run._cached is not None and run.data("grad_hist_1d") == plain.data("grad_hist_1d")
    steps, offsets, sizes = run._cached._lines["alpha"]
    run._cached._lines["alpha"] = (steps, offsets + 1, sizes)  # points into the middle of lines
    assert run.data("alpha") == plain.data("alpha")  # decoded from the log instead
    assert run._cached is None
    assert_same_as_reference(run)


def test_decode_number_reads_what_numpy_reads():
    import math

    values = ["NaN", "Infinity", "-Infinity", "abc", None, True, 3, 2.5, "1.5"]
    ours = [decode_number(v) for v in values]
    assert math.isnan(ours[0]) and math.isnan(ours[3]) and math.isnan(ours[4])  # text that is no number, None
    assert ours[1:3] == [math.inf, -math.inf] and ours[5:] == [1.0, 3.0, 2.5, 1.5]
    np.testing.assert_array_equal(np.array([v for v in values if v != "abc"], dtype=np.float64),
                                  [x for x, v in zip(ours, values) if v != "abc"])


@pytest.mark.parametrize("raw", LINES)
def test_line_decoding_without_orjson_is_json_loads(raw, monkeypatch):
    """orjson is optional: without it (or for a line it refuses) the json scanner gives the same."""
    monkeypatch.setattr("cockpit_lite.runlog.codec._orjson_loads", None)
    test_line_decoding_is_json_loads(raw)


def test_logs_read_the_same_without_orjson(tmp_path, monkeypatch):
    write_log(tmp_path)
    with_orjson = cockpit_lite.load(tmp_path, cache=False)
    monkeypatch.setattr("cockpit_lite.runlog.codec._orjson_loads", None)
    without = cockpit_lite.load(tmp_path, cache=False)
    assert_same_as_reference(without)
    assert without.records == with_orjson.records and without.header == with_orjson.header


def test_a_growing_log_read_from_a_cache_whose_records_fail_is_read_once(tmp_path):
    w = write_log(tmp_path, steps=range(6), close=False)
    cockpit_lite.load(tmp_path)
    run = cockpit_lite.load(tmp_path)
    run._cached._records_blob = b"not a pickle"  # the fallback: the log decoded again
    w.write({"type": "step", "step": 6, "values": {"loss": 6.0}})
    w.close({"steps": 7})
    assert run.refresh() == 0  # the fallback read the new lines already, and only once
    assert run.series("loss")[0].tolist() == [0, 1, 2, 3, 4, 5, 6] and run.finished
    assert_same_as_reference(run)


def test_cache_without_orjson_shares_the_key_strings(tmp_path, monkeypatch):
    from cockpit_lite.runlog.cache import _keys_shared, _without_data

    monkeypatch.setattr("cockpit_lite.runlog.codec._orjson_loads", None)
    write_log(tmp_path)
    plain = cockpit_lite.load(tmp_path, cache=False)
    assert not _keys_shared(plain.records)  # json decodes each line's keys anew
    stripped = _without_data(plain.records)
    assert _keys_shared(stripped) and stripped == [{**r, **({"data": {}} if "data" in r else {})} for r in plain.records]
    cockpit_lite.load(tmp_path)  # writes the cache
    assert_same_as_reference(cockpit_lite.load(tmp_path))


def test_a_finished_logs_cache_leaves_the_records_out(tmp_path):
    """A finished log cannot grow: its cache skips the records (the slow part of writing it on the
    first plot); asking for them decodes the log. A growing log's cache keeps them (see above)."""
    from cockpit_lite.runlog.cache import CachedRecords

    write_log(tmp_path)
    cockpit_lite.load(tmp_path)  # writes the cache
    run = cockpit_lite.load(tmp_path)
    assert run.finished and isinstance(run._cached, CachedRecords) and run._cached._records_blob is None
    assert run.data_keys() == cockpit_lite.load(tmp_path, cache=False).data_keys()
    assert_same_as_reference(run)  # decoded from the log
