"""The run log written in batches: step records reach the file every ``LOG_BATCH`` records in one write.

``BatchedWriter`` wraps a ``RunLogWriter`` (which keeps the crash and full-disk guarantees of each
write). Step records are encoded when they are written (so an unencodable record fails at once, as
before) and kept in memory until one of:

* ``LOG_BATCH`` (16) of them are waiting;
* any other record is written (an event, a skipped step, an amendment's step is a step record):
  the waiting ones first, so the file keeps the order of the records;
* ``MAX_DELAY_S`` (1 s) has passed since the oldest waiting record: checked at every write and by a
  small daemon thread, so a reader (the live dashboard, ``Cockpit.load``) sees a paused run's last
  records within about a second;
* ``flush()``, ``close()``, the writer being garbage-collected, or the interpreter exiting
  (``atexit``, also after an uncaught exception; only in the process that opened the log, not in a
  forked child).

So a process killed with SIGKILL (or by an unhandled signal such as SIGTERM's default) loses at most
the last ``LOG_BATCH`` step records and never corrupts the log (each batch is one ``write`` of whole
lines; a torn last line is tolerated by the reader as before). ``batch=1`` (what ``fsync=True``
uses) writes every record at once, as the unbatched writer does.

Only the process that opened the log writes it: in a forked child (a fork-based worker that trains a
copy of the model inherits the hooks and the waiting records) ``write`` and every flush write nothing,
neither the child's records nor the parent's waiting ones it inherited, and the child is told once
(``RunLogWriter.in_forked_child``). The process id is checked before the lock is taken: a fork can
copy the lock held by the parent's flush thread, and the child must never wait for it.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from typing import Any, Dict, List, Optional

LOG_BATCH = 16
MAX_DELAY_S = 1.0

_OPEN: "weakref.WeakSet[BatchedWriter]" = weakref.WeakSet()


def _flush_all() -> None:
    for writer in list(_OPEN):
        try:
            writer.flush()
        except Exception:
            pass


atexit.register(_flush_all)


def _timer(ref: "weakref.ref[BatchedWriter]", stop: threading.Event, delay: float) -> None:
    while not stop.wait(delay):
        writer = ref()
        if writer is None:
            return
        writer._flush_if_due()
        del writer


class BatchedWriter:
    def __init__(self, writer, batch: int = LOG_BATCH, max_delay: float = MAX_DELAY_S):
        self.writer = writer
        self.batch = max(1, int(batch))
        self.max_delay = max_delay
        self._lines: List[bytes] = []
        self._since: Optional[float] = None  # monotonic time of the oldest waiting record
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        _OPEN.add(self)

    # what the engine reads of the writer
    @property
    def path(self):
        return self.writer.path

    @property
    def logdir(self):
        return self.writer.logdir

    @property
    def closed(self) -> bool:
        return self.writer.closed

    @property
    def dropped(self) -> int:
        return self.writer.dropped

    @dropped.setter
    def dropped(self, value: int) -> None:
        self.writer.dropped = value

    def __getattr__(self, name: str) -> Any:  # failures, last_error, fsync, ...
        if name == "writer":
            raise AttributeError(name)
        return getattr(self.writer, name)

    def write(self, record: Dict[str, Any]) -> bool:
        """Encode ``record`` now; write it with the waiting ones when a flush is due (see the module)."""
        if self.writer.closed:
            raise RuntimeError("the run log is closed")
        if os.getpid() != self._pid:
            return not self.writer.in_forked_child()  # False, said once in this process
        data = self.writer.encode(record)
        now = time.monotonic()
        with self._lock:
            self._lines.append(data)
            if self._since is None:
                self._since = now
            if (self.batch == 1 or record.get("type") != "step" or len(self._lines) >= self.batch
                    or now - self._since >= self.max_delay):
                return self._flush_locked()
        if self._thread is None:
            self._start_timer()
        return True

    def flush(self) -> bool:
        """Write every waiting record now (in the process that opened the log only)."""
        if os.getpid() != self._pid:
            return False  # a forked child's copy of the buffer: the parent writes those records
        with self._lock:
            return self._flush_locked()

    def _flush_if_due(self) -> None:
        if os.getpid() != self._pid:
            return
        with self._lock:
            if self._lines and self._since is not None and time.monotonic() - self._since >= self.max_delay:
                self._flush_locked()

    def _flush_locked(self) -> bool:
        lines, self._lines, self._since = self._lines, [], None
        if not lines or self.writer.closed:
            return not lines
        if os.getpid() != self._pid:  # a forked child's copy of the waiting records: the parent writes them
            return not self.writer.in_forked_child()
        return self.writer.write_encoded(lines)

    def _start_timer(self) -> None:
        self._thread = threading.Thread(target=_timer, args=(weakref.ref(self), self._stop, self.max_delay),
                                        name="cockpit-lite-log-flush", daemon=True)
        self._thread.start()

    def close(self, footer: Optional[Dict[str, Any]] = None) -> None:
        """Write the waiting records, then the footer, and close (never raises for a failing write)."""
        self._stop.set()
        _OPEN.discard(self)
        if self.writer.closed:
            return
        if os.getpid() == self._pid:
            with self._lock:
                self._flush_locked()
        self.writer.close(footer)

    def __del__(self):
        try:
            self._stop.set()
            if not self.writer.closed:
                self.flush()
        except Exception:
            pass
