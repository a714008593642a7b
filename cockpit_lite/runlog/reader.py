"""``Run`` and ``load``: a run log read from disk, finished or still growing (see the package docstring
for how reading stays fast: columns, the cache, orjson)."""

from __future__ import annotations

import bisect
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

from ..gc_pause import gc_paused
from . import codec
from .cache import RunCache
from .codec import DUPLICATE, BadRecordError, CorruptLogError, FORMAT, LOG_NAME, VERSION, _check_step_number, _check_step_record, _decode_line, _short, _text_lines
from .files import open_for_reading
from .queries import RunQueries
from .scan import Scan, note_lines

if TYPE_CHECKING:  # numpy is imported where it is used (reading a log does not need it at import)
    import numpy as np

    Series = Tuple[np.ndarray, np.ndarray]

#: a line longer than this is reported as bad without being read into memory
MAX_LINE_BYTES = 64 * 1024 * 1024


class Run(RunQueries):
    """A run log read from disk: finished, or still being written (call ``refresh``).

    ``cache=True`` (what :func:`load` does) starts from the cache next to the log when it is valid
    and writes one when at least ``RunCache.MIN_BYTES`` of the log had to be decoded.
    """

    def __init__(self, path: Union[str, os.PathLike], *, cache: bool = False, strict: bool = False):
        p = Path(path)
        self.path = p / LOG_NAME if p.is_dir() else p
        if not self.path.exists():
            raise FileNotFoundError(f"no cockpit-lite run log at {self.path}")
        open_for_reading(self.path).close()  # a FIFO, a device, ...: refused before anything is read
        self.strict = strict
        #: ``[(line number, reason), ...]``: lines that are not valid records, skipped (``strict``: refused)
        self.bad_lines: List[Tuple[int, str]] = []
        self.header: Dict[str, Any] = {}
        self._records: List[Dict[str, Any]] = []  # step records, in order (see ``records``)
        self._by_step: Dict[int, Dict[str, Any]] = {}
        self._cached = None  # a CachedRecords: the records of a cache, not yet built (see ``records``)
        self.skipped: List[Dict[str, Any]] = []
        self.events: List[Dict[str, Any]] = []
        self.footer: Optional[Dict[str, Any]] = None
        self.torn_tail = False
        # steps with a second record read since the last warning (None while the log is read again)
        self._duplicates: Optional[List[int]] = []
        self._offset = 0
        self._line_no = 0
        self._columns: Optional[Dict[str, Tuple[Any, Any]]] = None  # key -> (steps, values), on demand
        self._steps = None  # the steps of the records as a numpy array, on demand
        self._data_index: Optional[Dict[str, List[Tuple[int, Any]]]] = None  # see data_index
        self._entries: Dict[Tuple[Optional[str], str], Tuple[Any, Any]] = {}  # field, data_field: on demand
        self._hasher = None  # with a cache: SHA-1 of exactly the bytes decoded so far (the lines before _offset)
        # with a cache: data key -> {step: (offset, size) of the line whose structure counts}
        self._data_lines: Optional[Dict[str, Dict[int, Tuple[int, int]]]] = None
        self._scan: Optional[Scan] = None  # see runlog/scan: a large finished log read without records
        store = RunCache(self.path) if cache else None
        cached = store.read(self) if store is not None else False
        if cached and self.bad_lines:
            self._warn_bad(self.bad_lines)
        if store is not None and not cached:
            self._hasher = RunCache.hasher()
            self._data_lines = {}
            if os.path.getsize(self.path) >= RunCache.MIN_BYTES and _ends_with_footer(self.path):
                self._scan = Scan(RunCache.FIELDS, RunCache.DATA_FIELDS)
        if self._scan is not None:
            try:
                self.refresh()
                with gc_paused():
                    state = store.layout(self, self._scan.state())
            except CorruptLogError:
                raise
            except Exception:  # something the scan does not take (a value that is no number): build the records
                state = None
            finally:
                self._scan = None
            if state is None:
                self._redecode()
                _warn_duplicates(self.path, self.flagged(DUPLICATE))
                return
            store.adopt(self, state, self._hasher)
            store.store(state)
            _warn_duplicates(self.path, self.flagged(DUPLICATE))
            return
        if cached:
            _warn_duplicates(self.path, self.flagged(DUPLICATE))
        self.refresh()
        decoded = self._offset - (store.covered if cached else 0) if store is not None else 0
        if decoded and decoded >= RunCache.MIN_BYTES:  # nothing decoded: the cache is current
            store.write(self)

    @property
    def records(self) -> List[Dict[str, Any]]:
        """The step records, in step order (amendments merged).

        A run read from a cache builds them here, on first use: plotting never needs them."""
        if self._cached is not None:
            cached, self._cached = self._cached, None
            try:
                with gc_paused():
                    self._records = cached.records()
            except Exception:  # a cache that passed its checks but whose records do not read back
                self._redecode()
            else:
                self._by_step = {r["step"]: r for r in self._records}
        return self._records

    def _redecode(self) -> None:
        """Forget everything read and decode the log again from its first byte (no cache)."""
        self.header, self._records, self._by_step = {}, [], {}
        self.skipped, self.events, self.footer = [], [], None
        self.bad_lines = []
        self._offset = self._line_no = 0
        self._columns = self._steps = self._data_index = None
        self._entries = {}
        self._hasher = self._data_lines = None
        self._duplicates = None  # said when this run was first read
        try:
            self.refresh()
        finally:
            self._duplicates = []

    @property
    def logdir(self) -> Path:
        return self.path.parent

    @property
    def finished(self) -> bool:
        return self.footer is not None

    def refresh(self) -> int:
        """Read lines appended since the last read; return how many records were added.

        The log is read in blocks; a line longer than ``MAX_LINE_BYTES`` is skipped without being
        held in memory and reported like any other bad line (see ``bad_lines``)."""
        if self._cached is not None and os.path.getsize(self.path) > self._offset:
            self._data_lines = self._cached.data_lines()  # the cache is rewritten with the new lines
            self.records  # noqa: B018 - new lines merge into the records: build them first
        added = 0
        bad_before = len(self.bad_lines)
        carry = b""  # the start of a line not yet complete
        long_line = None  # a hasher copy while a line over MAX_LINE_BYTES is skipped (or True: no cache)
        long_size = 0
        try:
            with open_for_reading(self.path) as fh:
                fh.seek(self._offset)
                while True:
                    block = fh.read(self.READ_BYTES)
                    if not block:
                        break
                    if long_line is not None:  # skip to the end of the long line
                        nl = block.find(b"\n")
                        part = block if nl < 0 else block[:nl + 1]
                        if self._hasher is not None:
                            long_line.update(part)
                        long_size += len(part)
                        if nl < 0:
                            continue
                        self._line_no += 1
                        self._offset += long_size
                        if self._hasher is not None:
                            self._hasher = long_line
                        self._bad(f"a line of {long_size - 1} bytes, over the limit of {MAX_LINE_BYTES} bytes")
                        long_line, long_size, block = None, 0, block[nl + 1:]
                    chunk = carry + block if carry else block
                    end = chunk.rfind(b"\n") + 1
                    carry = chunk[end:]
                    if end:
                        added += self._decode_lines(chunk[:end] if carry else chunk)
                    if len(carry) > MAX_LINE_BYTES:
                        long_line = self._hasher.copy() if self._hasher is not None else True
                        if self._hasher is not None:
                            long_line.update(carry)
                        long_size, carry = len(carry), b""
        finally:
            if added:
                # new or amended records: rebuild these on demand
                self._columns = self._steps = self._data_index = None
                self._entries = {}
            if len(self.bad_lines) > bad_before:
                self._warn_bad(self.bad_lines[bad_before:])
            if self._duplicates:
                _warn_duplicates(self.path, self._duplicates)
                self._duplicates = []
        self.torn_tail = bool(carry.strip()) or long_line is not None
        if self.torn_tail:
            # an unterminated last line: either still being written or cut by a crash
            try:
                if long_line is not None:
                    raise ValueError("over the line limit")
                json.loads(carry)
            except (ValueError, RecursionError):
                warnings.warn(
                    f"{self.path}: the last line (line {self._line_no + 1}) is incomplete "
                    "(the run was killed mid-write or is still writing); it was ignored",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return added

    #: bytes read from the log at once
    READ_BYTES = 32 * 1024 * 1024

    def _decode_lines(self, chunk: bytes) -> int:
        """Decode and merge the whole lines of ``chunk`` (it ends with a newline); how many were records."""
        lines = chunk.split(b"\n")
        lines.pop()  # b"" after the last newline
        # the text of every line at once, for json's scanner; orjson reads the bytes themselves
        texts = None if codec._orjson_loads is not None else _text_lines(chunk, len(chunk))
        if self._hasher is not None:
            self._hasher.update(chunk)
        added = 0
        add, decode = self._add, _decode_line
        with gc_paused():  # the records are acyclic: see cockpit_lite/gc_pause.py
            for i, raw in enumerate(lines):
                self._line_no += 1
                at = self._offset
                self._offset += len(raw) + 1
                if not raw or raw.isspace():
                    continue
                try:
                    record = decode(raw, texts[i] if texts is not None else None)
                    if type(record) is not dict or "type" not in record:
                        raise ValueError("not a record object")
                    add(record, at, len(raw))
                except CorruptLogError:
                    raise
                except (ValueError, RecursionError, OverflowError, TypeError) as err:
                    self._bad(f"{type(err).__name__}: {err}" if isinstance(err, RecursionError) else str(err))
                    continue
                added += 1
        return added

    def _bad(self, reason: str) -> None:
        """The line just counted is not a valid record: refused (``strict``) or skipped and noted."""
        if self.strict:
            raise CorruptLogError(f"{self.path}, line {self._line_no}: not a valid record ({reason})")
        self.bad_lines.append((self._line_no, reason))

    def _warn_bad(self, bad: List[Tuple[int, str]]) -> None:
        shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        warnings.warn(f"{self.path}: {len(bad)} line(s) are not valid records and were skipped ({shown}{more})",
                      RuntimeWarning, stacklevel=3)

    def _check_header(self, record: Dict[str, Any]) -> None:
        if record.get("format") != FORMAT:
            raise CorruptLogError(f"{self.path}: not a cockpit-lite log (format={_short(record.get('format'))})")
        version = record.get("version", 0)
        if type(version) is not int:
            raise CorruptLogError(f"{self.path}: the header's version is {_short(version)}, not an integer")
        if version > VERSION:
            raise CorruptLogError(
                f"{self.path}: log version {record.get('version')} is newer than this cockpit-lite reads "
                f"({VERSION}); upgrade cockpit-lite"
            )

    def _add(self, record: Dict[str, Any], at: int = -1, size: int = 0) -> None:
        """Merge one decoded line (``size`` bytes at offset ``at`` of the log) into the state."""
        kind = record["type"]
        if kind == "header":
            if self.header:
                raise CorruptLogError(
                    f"{self.path}, line {self._line_no}: a second header: this file holds two runs (two "
                    "processes wrote into one logdir, or a log was appended to another). cockpit-lite reads "
                    f"one run per file; split the file before line {self._line_no} to read each run")
            self._check_header(record)
            self.header = record
        elif not self.header:
            raise CorruptLogError(f"{self.path}, line {self._line_no}: records before the header")
        elif kind == "step":
            step = _check_step_record(record)
            if self._scan is not None:
                self._scan.add(step, record, at, size)
                return
            if self._data_lines is not None:
                data = record.get("data")
                if data and type(data) is dict:  # where the cache finds each structure again
                    note_lines(self._data_lines, step, data, (at, size))
            earlier = self._by_step.get(step)
            if earlier is not None:  # an amendment (a value known one step later, e.g. alpha)
                for part in ("values", "reasons", "data"):
                    if part in record:
                        earlier.setdefault(part, {}).update(record[part])
                flags = record.get("flags") or []
                if not record.get("amends"):  # a second record of the step: flagged (see DUPLICATE)
                    flags = [*flags, DUPLICATE]
                    if self._duplicates is not None:
                        self._duplicates.append(step)
                if flags:
                    earlier["flags"] = sorted(set(earlier.get("flags", ())) | set(flags))
            else:
                if record.get("amends"):  # its step had no record of its own (untracked)
                    record = {k: v for k, v in record.items() if k != "amends"}
                self._by_step[step] = record
                records = self._records
                if records and records[-1]["step"] > step:
                    at = bisect.bisect([r["step"] for r in records], step)
                    records.insert(at, record)
                else:
                    records.append(record)
        elif kind == "skipped":
            _check_step_number(record)
            if not isinstance(record.get("reason", ""), str):
                raise BadRecordError(f"'reason' is {_short(record['reason'])}, not text")
            self.skipped.append(record)
        elif kind == "event":
            if not isinstance(record.get("message", ""), str):
                raise BadRecordError(f"'message' is {_short(record['message'])}, not text")
            self.events.append(record)
        elif kind == "footer":
            self.footer = record
        # unknown record types from newer minor versions are ignored on purpose

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self._cached.steps) if self._cached is not None else len(self._records)

    def __repr__(self):
        state = "finished" if self.finished else "running or interrupted"
        return f"Run({str(self.path)!r}, {len(self)} step records, {state})"


def _warn_duplicates(path: Path, steps: List[int]) -> None:
    """Warn that ``steps`` each have more than one (non-amendment) record: merged, the later values winning."""
    if not steps:
        return
    shown = ", ".join(str(s) for s in steps[:5]) + (f" and {len(steps) - 5} more" if len(steps) > 5 else "")
    warnings.warn(f"{path}: {len(steps)} step(s) have two records that are not amendments ({shown}): two writers "
                  f"or a step counter that went back; their values were merged, the later line winning, and "
                  f"the steps are flagged {DUPLICATE!r} (Run.flagged)", RuntimeWarning, stacklevel=3)


def _ends_with_footer(path: Path) -> bool:
    """Whether the last line of the log is a complete footer record (the run was closed)."""
    with open_for_reading(path) as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 65536))
        tail = fh.read()
    if not tail.endswith(b"\n"):
        return False
    last = tail[:-1].rsplit(b"\n", 1)[-1]
    try:
        record = json.loads(last)
    except (ValueError, RecursionError):
        return False
    return isinstance(record, dict) and record.get("type") == "footer"


def load(path: Union[str, os.PathLike], *, cache: bool = True, strict: bool = False) -> Run:
    """Read a run log (a logdir or the ``cockpit.jsonl`` file itself), finished or still growing.

    ``cache``: start from the cache next to a large log when it is still valid and refresh it
    (see ``cockpit_lite.runlog.cache``); ``False`` decodes the whole log and writes nothing.
    A line that is not a valid record (not JSON, too deep, over ``MAX_LINE_BYTES``, a step that is
    not an integer, a value that is no number, ...) costs that line only: it is skipped, listed in
    ``Run.bad_lines`` with its line number and reason, and a ``RuntimeWarning`` says so;
    ``strict=True`` raises ``CorruptLogError`` naming the line instead. A file that is not one
    run's log (no or a bad header, a second header) and a path that is not a regular file (a FIFO,
    a device) are refused with a clear error.
    """
    return Run(path, cache=cache, strict=strict)

