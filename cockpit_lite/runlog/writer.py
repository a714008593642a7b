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
    counted in ``dropped``, never the header: without it the log could not be read), and one
    ``RuntimeWarning`` says so. ``close`` writes the count of dropped records into the footer
    (``dropped_records``).

    A log file removed while it is written (``rm -rf`` of the logdir) is noticed at the next
    ``write_encoded`` (one ``fstat`` per call: per batch with ``BatchedWriter``): one warning, then
    the logdir and the file are created again, the header first, and the records go on there; the
    records written into the removed file are counted in ``dropped``. If the file cannot be created
    again, records are kept and dropped as for a failed write. A writer used in a process other than
    the one that opened it (a forked child) writes nothing, and says so once in that process.
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
        self._home = os.path.abspath(folder)  # where a removed log is created again, whatever the cwd is by then
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
        self._pid = os.getpid()  # the process that opened the log: the only one that writes it
        self._warned: set = set()  # once-only warnings given ("removed", "recreate", a forked child's pid)
        self._written = 0  # records (not the header) written into the current file
        self._header = self.encode({"type": "header", "format": FORMAT, "version": VERSION, **header})
        self.write_encoded([self._header])
        self._written = 0

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
        if self.in_forked_child():
            return False
        if (not self._file_in_place() or (self._pending and not self._flush_pending())
                or not self._write_line(b"".join(lines))):
            for data in lines:
                self._keep(data)
            return False
        self._written += len(lines)
        return True

    def in_forked_child(self) -> bool:
        """True in a process other than the one that opened the log (a forked child): it writes nothing
        there (its records, and the parent's records it inherited, would mix into the parent's log)."""
        pid = os.getpid()
        if pid == self._pid:
            return False
        if pid not in self._warned:
            self._warned.add(pid)
            warnings.warn(
                f"cockpit-lite: the run log {self.path} was opened by process {self._pid}; this process ({pid}) "
                "is a fork of it and writes nothing to it (its records would mix into the parent's log). A forked "
                "child that trains must open its own logdir: call cockpit_lite.watch(..., logdir=...) in the child",
                RuntimeWarning, stacklevel=4)
        return True

    def _file_in_place(self) -> bool:
        """False if the log file was removed (its logdir deleted) and cannot be created again now.

        One ``fstat``: a file that no folder links to any more (``st_nlink == 0``) takes writes that no
        one can read. It is created again (``files.claim``: never over a log another run wrote there
        since), with the header first; the records written into the removed file are counted dropped."""
        try:
            if os.fstat(self._fh.fileno()).st_nlink:
                return True
        except (OSError, ValueError):  # cannot tell: write as before
            return True
        try:
            folder, fd = claim(self._home, LOG_NAME, "error")
        except OSError as err:
            self.last_error = f"the log file was removed and could not be created again: {err}"
            if "recreate" not in self._warned:
                self._warned.add("recreate")
                warnings.warn(
                    f"cockpit-lite: the run log {self.path} was removed while the run wrote it, and it cannot be "
                    f"created again ({err}); training goes on, records are kept and written once it can (the "
                    "oldest are dropped and counted beyond a limit)", RuntimeWarning, stacklevel=5)
            return False
        lost = self._written
        self.last_error = f"the log file was removed, with {lost} record(s), and created again"
        old, self._fh = self._fh, open(fd, "ab", buffering=0)
        try:
            old.close()
        except OSError:
            pass
        self.dropped += lost
        self._written, self._size, self._torn = 0, 0, False
        if not (self._pending and self._pending[0] is self._header):
            self._pending.appendleft(self._header)
            self._pending_bytes += len(self._header)
        if "removed" not in self._warned:
            self._warned.add("removed")
            warnings.warn(
                f"cockpit-lite: the run log {self.path} was removed while the run wrote it (its folder deleted?); "
                f"it was created again, with the header, and the run's records go on there. The {lost} record(s) "
                "written before were removed with it (the footer's dropped_records counts them)",
                RuntimeWarning, stacklevel=5)
        return True

    def _flush_pending(self) -> bool:
        """Write the records kept from failed writes, oldest first; False if one fails again."""
        while self._pending:
            data = self._pending[0]
            if not self._write_line(data):
                return False
            self._pending_bytes -= len(self._pending.popleft())
            self._written += data is not self._header
        return True

    def _keep(self, data: bytes) -> None:
        """Keep ``data`` for a retry; beyond ``MAX_PENDING_BYTES`` drop the oldest kept records, never the
        header (it is the oldest while the log's first write has not succeeded)."""
        self._pending.append(data)
        self._pending_bytes += len(data)
        pending = self._pending
        while self._pending_bytes > self.MAX_PENDING_BYTES and pending:
            if pending[0] is self._header:
                if len(pending) == 1:
                    break
                header, dropped = pending.popleft(), pending.popleft()
                pending.appendleft(header)
            else:
                dropped = pending.popleft()
            self._pending_bytes -= len(dropped)
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
        """Write the footer (with ``dropped_records``) and close; never raises for a failing write.
        In a forked child (``in_forked_child``) it only closes that process's copy of the file."""
        if self.closed:
            return
        if os.getpid() != self._pid:
            self._pending.clear()
            footer = None  # the parent writes the footer; the child's copy of the counts says nothing
        try:
            if footer is not None:
                footer = {"type": "footer", **footer}
                if self.failures:
                    footer["write_failures"] = self.failures
                in_place = self._file_in_place()  # a removed log is created again for the footer
                if not in_place or not self._flush_pending():
                    # records still kept and the footer: dropped now (with the footer itself)
                    footer["dropped_records"] = self.dropped + len(self._pending)
                elif self.dropped or self.failures:
                    footer["dropped_records"] = self.dropped
                if not in_place or not self._write_line(self.encode(footer)):
                    self.dropped += 1
            self.dropped += len(self._pending)
            self._pending.clear()
            if self.dropped and os.getpid() == self._pid:
                warnings.warn(f"cockpit-lite: {self.dropped} record(s) could not be written to {self.path} "
                              f"({self.last_error})", RuntimeWarning, stacklevel=3)
        finally:
            try:
                self._fh.close()
            except OSError:
                pass
            self.closed = True

