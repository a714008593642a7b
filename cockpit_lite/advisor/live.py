"""Live advice: a run-log sink that re-reads the log now and then, runs the rules, and warns once per
diagnosis (also writing it into the run log as an event of level "diagnosis").

The sink keeps what the rules read of the records it is given, in bounded windows
(``window.RecentRun``): its memory does not grow with the run, and a check never re-reads the log
(only the header, once). Checks come every ``every`` step records at first, then every 10% of the
run's length (a run of 100,000 steps is checked about 100 times, not 4,000). The first flagged
(non-finite) or skipped step is checked at once, so a divergence is named at the step it happened.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, Optional

from . import diagnose
from .thresholds import Thresholds
from .window import RecentRun, read_header

GROWTH = 1.1  # the next scheduled check comes after 10% more records


class AdvisorSink:
    def __init__(self, logdir: str, emit_event: Callable[..., None], every: int = 25,
                 thresholds: Optional[Dict[str, Any]] = None):
        self.logdir = logdir
        self.emit_event = emit_event  # emit_event(level, message, **fields)
        self.every = max(1, int(every))
        from .thresholds import validate

        self.thresholds = validate(thresholds) or None  # a misspelled name fails here, as on the command line
        self._seen: set = set()
        self._records = 0
        self._next_check = self.every
        self._alarm_checked = False
        self._run: Optional[RecentRun] = None  # created at the first record (the header is then written)

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("type") not in ("step", "skipped"):
            return
        if self._run is None:
            th = Thresholds().with_overrides(self.thresholds)
            self._run = RecentRun(read_header(self._log_path()), th.window, th.min_points)
        self._run.add(record)
        if record.get("amends"):
            return
        if not self._records:  # said once in the log, so that a quiet advisor reads as "on, nothing found"
            self.emit_event("info", "advisor on: its rules run while training; a diagnosis is logged when one "
                                    "holds", advisor="on")
        self._records += 1
        alarm = bool(record.get("flags")) or record.get("type") == "skipped"
        if self._records >= self._next_check or (alarm and not self._alarm_checked):
            self._alarm_checked = self._alarm_checked or alarm
            self.check()
            self._next_check = max(self._records + self.every, int(self._records * GROWTH))

    def _log_path(self):
        from ..runlog import LOG_NAME

        return os.path.join(self.logdir, LOG_NAME)

    def check(self) -> None:
        if self._run is None:
            return
        for d in diagnose(self._run, self.thresholds):
            if d.rule in self._seen:
                continue
            self._seen.add(d.rule)
            warnings.warn(f"cockpit-lite advisor: {d.summary()}", RuntimeWarning, stacklevel=2)
            self.emit_event("diagnosis", d.summary(), diagnosis=d.to_json())

    def close(self) -> None:
        pass
