"""``RunLogWriter``: appends the records of one run to ``LOGDIR/cockpit.jsonl`` (crash-safe, locked)."""

from __future__ import annotations

import errno
import json
import os
import warnings
from collections import deque
from typing import Any, Dict, List, Optional, Union

from .codec import FORMAT, LOG_NAME, VERSION, _clean
from .files import claim

try:  # optional: not a dependency, only faster
    from orjson import dumps as _orjson_dumps
except ImportError:  # pragma: no cover - depends on the environment
    _orjson_dumps = None


class RunLogWriter:
    """Appends records to ``LOGDIR/cockpit.jsonl``; every record is one flushed line.

    The log is created exclusively and locked (``files.claim``; ``if_exists`` says what to do
    when ``LOGDIR`` already holds one; ``logdir`` is then the folder actually used). A write that
    fails (a full disk: ``OSError`` 28, a quota, an I/O error) never raises: the line's partial
    bytes are cut off again (the log stays valid JSON lines), the record is kept to be retried
    before the next one (up to ``MAX_PENDING_BYTES`` of them; older ones are then dropped and
    counted in ``dropped``), and one ``RuntimeWarning`` says so. ``close`` writes the count of
    dropped records into the footer (``dropped_records``).
    """

    #: records kept for a retry while writes fail (bytes of JSON); beyond, the oldest are dropped
    MAX_PENDING_BYTES = 8 * 1024 * 1024

    def __init__(self, logdir: Union[str, os.PathLike], header: Dict[str, Any], fsync: bool = False,
                 if_exists: str = "error"):
        try:
            folder, fd = claim(logdir, LOG_NAME, if_exists)
        except (FileExistsError, ValueError):
            raise
        except OSError as err:
            raise OSError(f"cockpit-lite cannot write its run log in {str(logdir)!r}: {err.strerror or err}") from err
        self.logdir = folder
        self.path = folder / LOG_NAME
        # line-buffered text would split long lines into several writes; write bytes ourselves
        self._fh = open(fd, "ab", buffering=0)
        self.fsync = fsync
        self.closed = False
        self.dropped = 0  # records given up (see the class docstring)
        self.failures = 0  # writes that failed
        self.last_error: Optional[str] = None
        self._size = 0  # bytes of whole lines in the log: where a failed write is cut back to
        self._torn = False  # a failed write's bytes could not be cut off: the next line starts a new one
        self._pending: "deque[bytes]" = deque()
        self._pending_bytes = 0
        self.write({"type": "header", "format": FORMAT, "version": VERSION, **header})

    @staticmethod
    def encode(record: Dict[str, Any]) -> bytes:
        """``record`` as one line of JSON (non-finite numbers as strings)."""
        values = record.get("values")
        if values is not None and type(values) is dict:  # the hot path: a flat dict of floats
            values = {k: (v if (isinstance(v, float) and v - v == 0) else _clean(v)) for k, v in values.items()}
            record = {k: (values if k == "values" else _clean(v)) for k, v in record.items()}
        else:
            record = _clean(record)
        if _orjson_dumps is not None:  # the same JSON values, about 10x faster; anything it refuses: json
            try:
                return _orjson_dumps(record) + b"\n"
            except TypeError:  # orjson.JSONEncodeError: huge integers, surrogates, foreign types
                pass
        return (json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n").encode("utf-8")

    def write(self, record: Dict[str, Any]) -> bool:
        """Append ``record``; False if it could not be written now (kept for a retry, or dropped)."""
        return self.write_encoded([self.encode(record)])

    def write_encoded(self, lines: List[bytes]) -> bool:
        """Append encoded records (``encode``) in one write; on a failure each is kept for a retry."""
        if self.closed:
            raise RuntimeError("the run log is closed")
        if (self._pending and not self._flush_pending()) or not self._write_line(b"".join(lines)):
            for data in lines:
                self._keep(data)
            return False
        return True

    def _flush_pending(self) -> bool:
        """Write the records kept from failed writes, oldest first; False if one fails again."""
        while self._pending:
            if not self._write_line(self._pending[0]):
                return False
            self._pending_bytes -= len(self._pending.popleft())
        return True

    def _keep(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        while self._pending_bytes > self.MAX_PENDING_BYTES and self._pending:
            self._pending_bytes -= len(self._pending.popleft())
            self.dropped += 1

    def _write_line(self, data: bytes) -> bool:
        """One whole line, or nothing: on a failure the bytes written are cut off again."""
        if self._torn:  # an earlier line's bytes are still there: end that line first
            data = b"\n" + data
        view = memoryview(data)
        try:
            # a raw (unbuffered) file may write fewer bytes than asked; loop until the line is out
            while view:
                n = self._fh.write(view)
                if n is None or n <= 0:
                    raise OSError(errno.EIO, "the file accepted no bytes")
                view = view[n:]
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError as err:
            self._failed(err, partial=len(view) < len(data))
            return False
        self._size += len(data)
        self._torn = False
        return True

    def _failed(self, err: OSError, partial: bool) -> None:
        self.failures += 1
        self.last_error = f"{type(err).__name__} {err.errno}: {err.strerror or err}" if err.errno else repr(err)
        if partial or self._torn:
            try:  # cut the torn line off: the log ends with a whole line again
                os.ftruncate(self._fh.fileno(), self._size)
                self._torn = False
            except OSError:
                self._torn = True  # the reader skips the torn line; the next line starts on its own
        if self.failures == 1:
            warnings.warn(
                f"cockpit-lite: writing the run log {self.path} failed ({self.last_error}); training goes on, "
                "records are kept and written again once writes succeed (the oldest are dropped and counted "
                "beyond a limit; the footer says how many)", RuntimeWarning, stacklevel=4)

    def close(self, footer: Optional[Dict[str, Any]] = None) -> None:
        """Write the footer (with ``dropped_records``) and close; never raises for a failing write."""
        if self.closed:
            return
        try:
            if footer is not None:
                footer = {"type": "footer", **footer}
                if self.failures:
                    footer["write_failures"] = self.failures
                if not self._flush_pending():
                    # records still kept and the footer: dropped now (with the footer itself)
                    footer["dropped_records"] = self.dropped + len(self._pending)
                elif self.dropped or self.failures:
                    footer["dropped_records"] = self.dropped
                if not self._write_line(self.encode(footer)):
                    self.dropped += 1
            self.dropped += len(self._pending)
            self._pending.clear()
            if self.dropped:
                warnings.warn(f"cockpit-lite: {self.dropped} record(s) could not be written to {self.path} "
                              f"({self.last_error})", RuntimeWarning, stacklevel=3)
        finally:
            try:
                self._fh.close()
            except OSError:
                pass
            self.closed = True

