"""The run log's cache: the decoded records of a large log, kept next to it (``.cockpit.jsonl.cache``)
so that plotting a long run does not decode all of its JSON again (see :class:`RunCache`). The log
stays the source of truth: a cache is used only while the log's first bytes hash to its digest."""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

from .gc_pause import gc_paused

if TYPE_CHECKING:
    from .runlog import Run


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles only plain data (dict, list, str, numbers, None): any class or function in the
    file is refused, so a planted cache file cannot run code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"a run-log cache holds plain data only, not {module}.{name}")


class RunCache:
    """The decoded records of a log's first ``covered`` bytes, kept in ``.<log name>.cache``.

    File: a magic line, then a pickle of plain data: the digest (SHA-1) of those bytes, how many
    bytes and lines they are, and the reader's state after them (header, records, skipped,
    events, footer, and the columns of ``Run.columns`` as raw float64/int64 bytes). The digest
    is taken of the bytes the reader decoded, as it decoded them. ``read`` uses the cache only
    when the log is at least that long and its first ``covered`` bytes hash to the digest (so a
    rewritten, truncated or replaced log, whatever its size and mtime, never matches); the bytes
    after them are then decoded from the log as usual, which is how a growing log (appended,
    never rewritten) keeps most of its cache. The log is never modified; failing to read or
    write the cache only costs time. Safety: the pickle is read with every class and function
    refused (plain data only), and its magic line carries a format number to bump whenever the
    reader's merging rules change.
    """

    MAGIC = b"cockpit-lite run-log cache 1\n"
    #: decode at least this many bytes of log before writing a cache: small logs are quick anyway
    MIN_BYTES = 8 * 1024 * 1024
    _STATE = ("header", "records", "skipped", "events", "footer")

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
        try:
            with open(self.path, "rb") as fh:
                if fh.read(len(self.MAGIC)) != self.MAGIC:
                    return False
                with gc_paused():
                    state = _PlainDataUnpickler(fh).load()
            covered, lines = state["covered"], state["lines"]
            if state["byteorder"] != sys.byteorder:  # the columns are raw machine numbers
                return False
            if not (isinstance(covered, int) and isinstance(lines, int) and isinstance(state["records"], list)
                    and isinstance(state["header"], dict)):
                return False
            with open(self.log_path, "rb") as log:
                hasher = self.digest(log, covered)
            if hasher is None or hasher.hexdigest() != state["digest"]:
                return False
            records = state["records"]
            by_step = {r["step"]: r for r in records}
            columns = _columns_from_bytes(state["columns"])
        except Exception:  # missing, unreadable, foreign or corrupt: decode the log instead
            return False
        if state["header"]:
            run._check_header(state["header"])  # a log this version cannot read is refused as without cache
        run.header, run.records, run.skipped, run.events, run.footer = (state[k] for k in self._STATE)
        run._by_step = by_step
        run._columns = columns
        run._offset, run._line_no = covered, lines
        run._hasher = hasher  # refresh goes on hashing the lines it decodes after these
        self.covered = covered
        return True

    def write(self, run: "Run") -> bool:
        """Store ``run``'s state (everything up to its last complete line); atomic, best effort."""
        with gc_paused():  # copying and pickling a million objects: see cockpit_lite/gc_pause.py
            return self._write(run)

    def _write(self, run: "Run") -> bool:
        tmp = None
        try:
            # the digest of the very bytes the records were decoded from (not of the file now)
            state = {"covered": run._offset, "lines": run._line_no, "digest": run._hasher.hexdigest(),
                     "byteorder": sys.byteorder,
                     **{k: getattr(run, k) for k in self._STATE}}
            state["records"] = _shared_keys(run.records)
            state["columns"] = {k: (s.tobytes(), v.tobytes()) for k, (s, v) in run.columns().items()}
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(self.MAGIC)
                pickle.dump(state, fh, protocol=4)
            # mkstemp makes it private: give it the log's permissions (who may read the log may read this)
            os.chmod(tmp, os.stat(self.log_path).st_mode & 0o666)
            os.replace(tmp, self.path)
            self.covered = run._offset
            return True
        except Exception:  # a read-only logdir, a full disk: plotting goes on without a cache
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False


def _columns_from_bytes(stored: Dict[str, Tuple[bytes, bytes]]) -> Dict[str, Tuple[Any, Any]]:
    """The inverse of the cache's ``(steps.tobytes(), values.tobytes())`` per key (read-only arrays)."""
    import numpy as np

    out = {}
    for key, (steps, values) in stored.items():
        s, v = np.frombuffer(steps, dtype=np.int64), np.frombuffer(values, dtype=np.float64)
        if not isinstance(key, str) or len(s) != len(v):
            raise ValueError(f"cached column {key!r} is malformed")
        out[key] = (s, v)
    return out


def _shared_keys(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Copies of ``records`` whose ``values`` and ``data`` dicts share their key strings, so that
    pickle stores each key once rather than once per record (a 3x smaller, 2x faster cache)."""
    canonical: Dict[tuple, tuple] = {}

    def shared(d):
        signature = tuple(d)
        keys = canonical.get(signature)
        if keys is None:
            keys = canonical[signature] = tuple(sys.intern(k) for k in signature)
        return dict(zip(keys, d.values()))

    out = []
    for r in records:
        r = dict(r)
        for part in ("values", "data"):
            d = r.get(part)
            if d and isinstance(d, dict):
                r[part] = shared(d)
        out.append(r)
    return out
