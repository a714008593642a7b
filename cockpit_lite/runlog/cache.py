"""The run log's cache: what plotting a large log needs, kept next to it (``.cockpit.jsonl.cache``)
so that plotting a long run does not decode all of its JSON again (see :class:`RunCache`). The log
stays the source of truth: a cache is used only while the log's first bytes hash to its digest."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..gc_pause import gc_paused

if TYPE_CHECKING:
    from .reader import Run


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only plain data (dict, list, str, numbers, None): any class or function in the
    file is refused, so a planted cache file cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a run-log cache holds plain data only, not {module}.{name}")


def _plain_loads(blob: bytes) -> Any:
    """``pickle.loads`` restricted to plain data (see ``_PlainDataUnpickler``)."""
    with gc_paused():
        return _PlainDataUnpickler(io.BytesIO(blob)).load()


def _plain_dumps(obj: Any) -> bytes:
    """A pickle of plain data, stored inside the cache's own pickle and read by ``_plain_loads``."""
    return pickle.dumps(obj, protocol=4)


class CachedRecords:
    """A run's records as the cache holds them: the small parts at once, the large ones on demand.

    Plotting needs the columns (``Run.columns``), the steps, the reasons and flags, a few record
    fields and the structures of a few ``data`` keys; the records themselves (a million objects
    for 100,000 steps) are needed only by code that iterates them. So the records (without their
    ``data``) are a separate pickle, unpickled (with the same restricted unpickler) only when
    asked for, and stored only while the log can still grow (no footer): new lines are merged into
    them. A finished log's cache leaves them out (copying and pickling them cost more than a second
    on the first plot); ``records()`` then raises and ``Run.records`` decodes the log again.

    The structures of each ``data`` key are not copied at all: the cache holds where they are in
    the log (per step, the offset and size of the line whose structure counts: the last line of
    that step holding the key, as the reader merges amendments), and ``data(key)`` decodes those
    lines when first asked (pickling and unpickling 100,000 per-step structures cost more than
    decoding the few thousand lines a plot reads). The log's first ``covered`` bytes matched the
    digest, so the lines are where they were; a line that does not hold what was noted is an
    error (``Run`` then decodes the log again). What the dashboard reads of the per-step
    structures is at hand without them: their numeric entries as columns (``data_fields``: the
    entries ``RunCache.DATA_FIELDS`` names) and each key's last structure (``last``); so are
    the record fields of ``RunCache.FIELDS``.
    """

    def __init__(self, state: Dict[str, Any], log_path: Path):
        import numpy as np

        self.log_path = log_path
        self.steps = np.frombuffer(state["steps"], dtype=np.int64)
        self.reasons: Dict[str, Dict[int, str]] = state["reasons"]
        self.flags: Dict[str, List[int]] = state["flags"]
        self.fields = _columns_from_bytes(state["fields"], state["step_arrays"])
        self.data_fields = {(key, name): column for key, stored in state["data_fields"].items()
                            for name, column in _columns_from_bytes(stored, state["step_arrays"]).items()}
        self.last: Dict[str, Tuple[int, Any]] = {k: tuple(v) for k, v in state["last"].items()}
        self._records_blob: Optional[bytes] = state["records"]  # None: a finished log's (see above)
        self._lines = {key: _lines_from_bytes(stored) for key, stored in state["data"].items()}
        self._data: Dict[str, List[Tuple[int, Any]]] = {}
        if not (isinstance(self.reasons, dict) and isinstance(self.flags, dict)
                and isinstance(self._records_blob, (bytes, type(None)))):
            raise ValueError("malformed cached records")

    def data_keys(self) -> List[str]:
        return list(self._lines)

    def data(self, key: str) -> List[Tuple[int, Any]]:
        """``[(step, structure), ...]`` of one ``data`` key (decoded from the log on first use)."""
        if key not in self._data:
            lines = self._lines.get(key)
            self._data[key] = [] if lines is None else _structures(self.log_path, key, *lines)
        return self._data[key]

    def data_lines(self) -> Dict[str, Dict[int, Tuple[int, int]]]:
        """``Run._data_lines`` as it was when the cache was written."""
        return {key: dict(zip(steps.tolist(), zip(offsets.tolist(), sizes.tolist())))
                for key, (steps, offsets, sizes) in self._lines.items()}

    def records(self) -> List[Dict[str, Any]]:
        """The full records: the stored ones with every ``data`` key put back."""
        if self._records_blob is None:
            raise LookupError("the cache of a finished log does not hold the records")
        records = _plain_loads(self._records_blob)
        if not isinstance(records, list) or len(records) != len(self.steps):
            raise ValueError("cached records are malformed")
        by_step = {r["step"]: r for r in records}
        for key in self._lines:
            for step, structure in self.data(key):
                by_step[step]["data"][key] = structure
        return records


def _lines_to_bytes(lines: Dict[int, Tuple[int, int]]) -> Tuple[bytes, bytes, bytes]:
    """``{step: (offset, size)}`` as raw int64 arrays (steps, offsets, sizes), in step order."""
    import numpy as np

    steps = np.fromiter(lines, dtype=np.int64, count=len(lines))
    where = np.array(list(lines.values()), dtype=np.int64).reshape(-1, 2)
    order = np.argsort(steps, kind="stable")
    return steps[order].tobytes(), where[order, 0].tobytes(), where[order, 1].tobytes()


def _lines_from_bytes(stored: Tuple[bytes, bytes, bytes]):
    import numpy as np

    steps, offsets, sizes = (np.frombuffer(raw, dtype=np.int64) for raw in stored)
    if not len(steps) == len(offsets) == len(sizes):
        raise ValueError("cached line index is malformed")
    return steps, offsets, sizes


def _structures(log_path: Path, key: str, steps, offsets, sizes) -> List[Tuple[int, Any]]:
    """``[(step, structure of key), ...]`` read from the noted lines of the log."""
    import mmap

    from .codec import _decode_line
    from .files import open_for_reading

    out = []
    with open_for_reading(log_path) as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as log:
        with gc_paused():
            for step, at, size in zip(steps.tolist(), offsets.tolist(), sizes.tolist()):
                record = _decode_line(log[at:at + size])
                data = record.get("data") if type(record) is dict else None
                if type(data) is not dict or key not in data or record.get("step") != step:
                    raise ValueError(f"{log_path}: the line at byte {at} does not hold step {step}'s {key!r}")
                out.append((step, data[key]))
    return out


class RunCache:
    """The state of a log's first ``covered`` bytes, kept in ``.<log name>.cache``.

    File: a magic line, then a pickle of plain data: the digest (SHA-1) of those bytes, how many
    bytes and lines they are, and the reader's state after them: header, skipped, events, footer,
    the columns of ``Run.columns`` as raw float64/int64 bytes (step arrays shared between
    columns), the record steps, reasons, flags, the numbers named in ``FIELDS`` and
    ``DATA_FIELDS``, the last structure of each ``data`` key, where in the log each ``data``
    key's structures are (offset and size of their lines), and (as a separate pickle, see
    :class:`CachedRecords`) the records of a log that can still grow. The digest
    is taken of the bytes the reader decoded, as it decoded them. ``read`` uses the cache only
    when the log is at least that long and its first ``covered`` bytes hash to the digest (so a
    rewritten, truncated or replaced log, whatever its size and mtime, never matches); the bytes
    after them are then decoded from the log as usual, which is how a growing log (appended,
    never rewritten) keeps most of its cache. The log is never modified; failing to read or
    write the cache only costs time. Safety: every pickle is read with every class and function
    refused (plain data only), and the magic line carries a format number to bump whenever the
    reader's merging rules or this layout change.
    """

    MAGIC = b"cockpit-lite run-log cache 5\n"
    #: decode at least this many bytes of log before writing a cache: small logs are quick anyway
    MIN_BYTES = 8 * 1024 * 1024
    #: record fields and ``(data key, entry)`` numbers kept as columns: what the dashboard and the
    #: advisor read of them (the batch size; how many steps an energy record covers). Any other
    #: is read from the records or the structures, which a cached run then builds or unpickles.
    FIELDS = ("samples",)
    DATA_FIELDS = (("energy", "steps"), ("energy", "total.error_j"), ("hess_max_ev", "converged"))
    _STATE = ("header", "skipped", "events", "footer", "bad_lines")

    def __init__(self, log_path: Path):
        self.log_path = Path(log_path)
        self.path = self.log_path.with_name(f".{self.log_path.name}.cache")
        self.covered = 0

    @staticmethod
    def hasher():
        return hashlib.sha1(usedforsecurity=False)

    @classmethod
    def digest(cls, fh, nbytes: int):
        """SHA-1 hasher fed with the first ``nbytes`` of the open file ``fh`` (None if it is shorter)."""
        h = cls.hasher()
        fh.seek(0)
        left = nbytes
        while left > 0:
            block = fh.read(min(left, 1 << 24))
            if not block:
                return None
            h.update(block)
            left -= len(block)
        return h

    def read(self, run: "Run") -> bool:
        """Put the cached state into ``run`` (fresh, nothing read yet) if the cache is valid."""
        from .files import open_for_reading

        try:
            with open_for_reading(self.path) as fh:
                if fh.read(len(self.MAGIC)) != self.MAGIC:
                    return False
                with gc_paused():
                    state = _PlainDataUnpickler(fh).load()
            covered, lines = state["covered"], state["lines"]
            if state["byteorder"] != sys.byteorder:  # the columns are raw machine numbers
                return False
            if not (isinstance(covered, int) and isinstance(lines, int) and isinstance(state["header"], dict)
                    and isinstance(state["bad_lines"], list)):
                return False
            with open_for_reading(self.log_path) as log:
                hasher = self.digest(log, covered)
            if hasher is None or hasher.hexdigest() != state["digest"]:
                return False
            self.adopt(run, state, hasher)
        except Exception:  # missing, unreadable, foreign or corrupt: decode the log instead
            return False
        return True

    def adopt(self, run: "Run", state: Dict[str, Any], hasher) -> None:
        """Make ``state`` (the stored layout, see ``layout``) ``run``'s state; ``hasher`` has
        hashed the ``state["covered"]`` bytes it stands for."""
        cached = CachedRecords(state, self.log_path)
        columns = _columns_from_bytes(state["columns"], state["step_arrays"])
        if state["header"]:
            run._check_header(state["header"])  # a log this version cannot read is refused as without cache
        for name in self._STATE:
            setattr(run, name, state[name])
        run._cached = cached  # records on demand: see Run.records
        run._columns = columns
        run._offset, run._line_no = state["covered"], state["lines"]
        run._hasher = hasher  # refresh goes on hashing the lines it decodes after these
        self.covered = state["covered"]

    def parts(self, run: "Run") -> Dict[str, Any]:
        """What the cache keeps of ``run``, a run that has built its records (``Scan.state`` gives
        the same for a finished log read without them)."""
        records = run.records
        last = {k: max(lines) for k, lines in run._data_lines.items()}
        return {"columns": run.columns(), "steps": run.steps(),
                "reasons": _by_key(records, "reasons"), "flags": _flags(records),
                "fields": {name: run.field(name) for name in self.FIELDS},
                "data_fields": {pair: run.data_field(*pair) for pair in self.DATA_FIELDS},
                "data_lines": run._data_lines,
                "last": {k: (step, run._by_step[step]["data"][k]) for k, step in last.items()},
                "records": None if run.finished else _without_data(records)}

    def layout(self, run: "Run", parts: Dict[str, Any]) -> Dict[str, Any]:
        """``parts`` of ``run``'s first ``run._offset`` bytes as the cache file holds them."""
        step_arrays: Dict[bytes, int] = {}  # most columns have the same steps: stored once
        entries: Dict[str, Dict[str, Tuple[Any, Any]]] = {}  # data key -> entry -> column
        for (key, name), column in parts["data_fields"].items():
            entries.setdefault(key, {})[name] = column
        records = parts.get("records")
        return {"covered": run._offset, "lines": run._line_no, "digest": run._hasher.hexdigest(),
                "byteorder": sys.byteorder, **{k: getattr(run, k) for k in self._STATE},
                "columns": _columns_to_bytes(parts["columns"], step_arrays),
                "fields": _columns_to_bytes(parts["fields"], step_arrays),
                "steps": parts["steps"].tobytes(),
                "reasons": parts["reasons"], "flags": parts["flags"],
                "records": None if records is None else _plain_dumps(records),
                "data": {k: _lines_to_bytes(lines) for k, lines in parts["data_lines"].items()},
                "data_fields": {k: _columns_to_bytes(v, step_arrays) for k, v in entries.items()},
                "last": parts["last"],
                "step_arrays": list(step_arrays)}

    def write(self, run: "Run") -> bool:
        """Store ``run``'s state (everything up to its last complete line); atomic, best effort."""
        with gc_paused():  # copying and pickling a million objects: see cockpit_lite/gc_pause.py
            try:
                state = self.layout(run, self.parts(run))
            except Exception:
                return False
            return self.store(state)

    def store(self, state: Dict[str, Any]) -> bool:
        """Write ``state`` (the stored layout) as the cache file; atomic, best effort."""
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.MAGIC)
                pickle.dump(state, fh, protocol=4)
            # mkstemp makes it private: give it the log's permissions (who may read the log may read this)
            os.chmod(tmp, os.stat(self.log_path).st_mode & 0o666)
            os.replace(tmp, self.path)
            self.covered = state["covered"]
            return True
        except Exception:  # a read-only logdir, a full disk: plotting goes on without a cache
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False


def _columns_to_bytes(columns: Dict[str, Tuple[Any, Any]], step_arrays: Dict[bytes, int]) -> Dict[str, Tuple[int, bytes]]:
    """key -> (index of its steps in ``step_arrays``, values as raw float64 bytes)."""
    out = {}
    for key, (steps, values) in columns.items():
        raw = steps.tobytes()
        out[key] = (step_arrays.setdefault(raw, len(step_arrays)), values.tobytes())
    return out


def _columns_from_bytes(stored: Dict[str, Tuple[int, bytes]], step_arrays: List[bytes]) -> Dict[str, Tuple[Any, Any]]:
    """The inverse of ``_columns_to_bytes`` (read-only arrays)."""
    import numpy as np

    steps_of = [np.frombuffer(raw, dtype=np.int64) for raw in step_arrays]
    out = {}
    for key, (index, values) in stored.items():
        s, v = steps_of[index], np.frombuffer(values, dtype=np.float64)
        if not isinstance(key, str) or len(s) != len(v):
            raise ValueError(f"cached column {key!r} is malformed")
        out[key] = (s, v)
    return out


def _by_key(records: List[Dict[str, Any]], part: str) -> Dict[str, Dict[int, Any]]:
    """key -> {step: value} over the records' ``part`` dicts (``reasons``), in record order."""
    out: Dict[str, Dict[int, Any]] = {}
    for r in records:
        d = r.get(part)
        if d and isinstance(d, dict):
            for k, v in d.items():
                out.setdefault(k, {})[r["step"]] = v
    return out


def _flags(records: List[Dict[str, Any]]) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for r in records:
        for flag in dict.fromkeys(r.get("flags", ())):
            out.setdefault(flag, []).append(r["step"])
    return out


def _without_data(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``records`` with their ``data`` dicts emptied (kept as ``{}``: ``CachedRecords`` refills
    them from the per-key pickles), their ``values`` dicts sharing their key strings, so that
    pickle stores each key once rather than once per record (a 3x smaller, 2x faster cache).
    orjson's records share them already (it caches keys); json's get copies that do."""
    share = not _keys_shared(records)
    canonical: Dict[tuple, tuple] = {}
    out = []
    for r in records:
        values = r.get("values")
        if share and values and isinstance(values, dict):
            signature = tuple(values)
            keys = canonical.get(signature)
            if keys is None:
                keys = canonical[signature] = tuple(sys.intern(k) for k in signature)
            r = dict(r)
            r["values"] = dict(zip(keys, values.values()))
        if isinstance(r.get("data"), dict):
            r = dict(r)
            r["data"] = {}
        out.append(r)
    return out


def _keys_shared(records: List[Dict[str, Any]], sample: int = 1000) -> bool:
    """Whether the first records with the same ``values`` keys hold the same key strings."""
    first: Dict[tuple, tuple] = {}
    for r in records[:sample]:
        values = r.get("values")
        if values and isinstance(values, dict):
            signature = tuple(values)
            earlier = first.setdefault(signature, signature)
            if earlier is not signature:
                return all(a is b for a, b in zip(earlier, signature))
    return True
