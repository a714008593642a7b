"""Progress lines on stderr for long command-line work (``cockpit-lite plot`` of large logs).

``Progress.stage(text)`` marks the start of a stage. Nothing is printed while the work is short: once
``after`` seconds (default 2) have passed, each stage that starts prints one line with the time
elapsed, and ``done()`` prints the total. Enabled when the stream is a terminal (``enabled=None``),
or forced on/off (``--progress`` / ``--no-progress``). Lines, not a redrawn bar: no thread, so the
forked PNG writer (``dashboard_png``) never inherits a lock held by one.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO

AFTER = 2.0  # seconds of work before anything is printed


class Progress:
    def __init__(self, label: str, stream: Optional[TextIO] = None, *, enabled: Optional[bool] = None,
                 after: Optional[float] = None, clock: Callable[[], float] = time.perf_counter):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_tty(self.stream) if enabled is None else bool(enabled)
        self.after = AFTER if after is None else float(after)
        self.clock = clock
        self.t0 = clock()
        self.printed = 0

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def stage(self, text: str) -> None:
        self._say(f"{text} ...")

    def done(self, text: str = "done") -> None:
        if self.printed:  # only a run that said something closes with the total
            self._say(text, force=True)

    def _say(self, text: str, force: bool = False) -> None:
        t = self.elapsed()
        if not self.enabled or (t < self.after and not force):
            return
        try:
            print(f"{self.label}: [{t:5.1f} s] {text}", file=self.stream, flush=True)
            self.printed += 1
        except (OSError, ValueError):  # a closed or broken stderr never fails the command
            self.enabled = False


def _is_tty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
