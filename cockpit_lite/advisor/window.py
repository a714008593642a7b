"""``RecentRun``: what the live advisor keeps of a run, bounded windows instead of the whole history.

The rules (``rules.py``) read a ``cockpit_lite.Run``; in the training process that would keep every
record (hundreds of MB per 1,000 steps on a model with 1,000 parameter tensors). ``RecentRun`` answers
the same reads (``series``, ``steps``, ``field``, ``flagged``, ``skipped``, ``reasons``, ``header``,
``keys``) from what the rules look at:

* run-level keys (no ``/``: ``loss``, ``alpha``, ``energy``, ...): the last ``long`` values
  (``6 x window``: the cost rule compares six windows); ``loss`` also its first ``head`` finite values
  (the rule comparing recent with initial loss);
* per-parameter keys (``grad_norm/fc.weight``, ...): the last ``window`` values each;
* step numbers and ``samples``: the last ``long``; flags and skipped steps: the first ``MAX_EVENTS``
  (the rules use the earliest); reasons: the last ``window`` per key;
* every value of the first flagged (non-finite) step: the divergence rule names the first parameter
  whose gradient was not finite there, however long ago that was.

Memory is thus bounded by the number of keys, not the number of steps.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np

from ..runlog import decode_number

#: earliest flagged steps per flag and earliest skipped records kept
MAX_EVENTS = 100


class RecentRun:
    def __init__(self, header: Dict[str, Any], window: int = 20, head: int = 5):
        self.header = header
        self.window = max(1, int(window))
        self.long = 6 * self.window
        self.head = max(1, int(head))
        self._columns: Dict[str, Deque[Tuple[int, float]]] = {}
        self._loss_head: List[Tuple[int, float]] = []
        self._steps: Deque[int] = deque(maxlen=self.long)
        self._fields: Dict[str, Deque[Tuple[int, float]]] = {}
        self._flags: Dict[str, List[int]] = {}
        self._reasons: Dict[str, Deque[Tuple[int, str]]] = {}
        self.skipped: List[Dict[str, Any]] = []
        self._pinned: Dict[str, Tuple[int, float]] = {}  # the values of the first flagged step
        # what else a Run has, for a rule that reads it: a live run is unfinished, its log is not re-read
        self.events: List[Dict[str, Any]] = []
        self.footer: Optional[Dict[str, Any]] = None
        self.finished = False
        self.torn_tail = False
        self.bad_lines: List[Tuple[int, str]] = []
        self._pinned_step: Optional[int] = None

    # -- feeding --------------------------------------------------------------------------------
    def add(self, record: Dict[str, Any]) -> None:
        """One record as the writer gets it (step, amendment, skipped); other types are ignored."""
        kind = record.get("type")
        if kind == "skipped":
            if len(self.skipped) < MAX_EVENTS:
                self.skipped.append({k: record[k] for k in ("step", "reason") if k in record})
            return
        if kind != "step" or type(record.get("step")) is not int:
            return
        step = record["step"]
        if record.get("flags") and self._pinned_step is None:
            self._pinned_step = step
        if step == self._pinned_step:
            for key, v in (record.get("values") or {}).items():
                self._pinned[key] = (step, decode_number(v))
        if not record.get("amends") and (not self._steps or self._steps[-1] != step):
            self._steps.append(step)
            for name in ("samples",):
                v = record.get(name)
                if isinstance(v, (int, float)):
                    self._fields.setdefault(name, deque(maxlen=self.long)).append((step, float(v)))
        for key, v in (record.get("values") or {}).items():
            self._add_value(key, step, decode_number(v))
        for key, why in (record.get("reasons") or {}).items():
            self._reasons.setdefault(key, deque(maxlen=self.window)).append((step, str(why)))
        for flag in record.get("flags") or ():
            steps = self._flags.setdefault(flag, [])
            if len(steps) < MAX_EVENTS:
                steps.append(step)

    def _add_value(self, key: str, step: int, value: float) -> None:
        column = self._columns.get(key)
        if column is None:
            column = self._columns[key] = deque(maxlen=self.window if "/" in key else self.long)
        if column and column[-1][0] >= step:  # an amendment of a step already held: replace or insert
            items = [p for p in column if p[0] != step] + [(step, value)]
            items.sort()
            column.clear()
            column.extend(items[-column.maxlen:])
        else:
            column.append((step, value))
        if key == "loss" and len(self._loss_head) < self.head and value == value and abs(value) != float("inf"):
            self._loss_head.append((step, value))

    # -- what the rules read ------------------------------------------------------------------------
    def series(self, key: str, *, start: Optional[int] = None, stop: Optional[int] = None):
        pairs = list(self._columns.get(key, ()))
        if key == "loss" and self._loss_head:
            first_kept = pairs[0][0] if pairs else None
            pairs = [p for p in self._loss_head if first_kept is None or p[0] < first_kept] + pairs
        pin = self._pinned.get(key)
        if pin is not None and all(p[0] != pin[0] for p in pairs):
            pairs = sorted(pairs + [pin])
        if start is not None:
            pairs = [p for p in pairs if p[0] >= start]
        if stop is not None:
            pairs = [p for p in pairs if p[0] < stop]
        return (np.array([p[0] for p in pairs], dtype=np.int64),
                np.array([p[1] for p in pairs], dtype=np.float64))

    def steps(self):
        return np.array(self._steps, dtype=np.int64)

    def field(self, name: str):
        pairs = list(self._fields.get(name, ()))
        return (np.array([p[0] for p in pairs], dtype=np.int64),
                np.array([p[1] for p in pairs], dtype=np.float64))

    def flagged(self, flag: str) -> List[int]:
        return list(self._flags.get(flag, ()))

    def reasons(self, key: str) -> Dict[int, str]:
        return dict(self._reasons.get(key, ()))

    def keys(self) -> List[str]:
        return list(self._columns)

    def data_keys(self) -> List[str]:
        return []

    def data(self, key: str) -> list:
        return []


def read_header(path) -> Dict[str, Any]:
    """The header record of the run log at ``path`` (its first line), {} if it cannot be read."""
    from ..runlog.files import open_for_reading

    try:
        with open_for_reading(path) as fh:
            line = fh.readline(1 << 20)
        record = json.loads(line)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and record.get("type") == "header" else {}
