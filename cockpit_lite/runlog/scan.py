"""Reading a large finished run log straight into the cache's state, without building its records.

``Run`` merges each decoded line into a record per step (amendments into the record they amend)
and builds columns from the records. For a finished log of 100,000 steps that is a million objects
built, scanned and freed, although plotting it reads only the columns and a few structures. A
:class:`Scan` takes the lines as they come instead, in file order, and keeps only what the cache
holds (see :class:`cockpit_lite.runlog.cache.CachedRecords`): the ``values`` of lines with the same
keys side by side, reasons, flags, the fields and structure entries the cache keeps as columns,
where each structure is in the log, and each key's last structure. The merging rules of
``Run._add`` are applied to these directly: for each step, the last line that gives a value,
reason or structure wins; flags add up; the record fields are those of the step's first line.
``tests/runlog/test_runlog_scan.py`` checks every reader method against a run that builds its records.
"""

from __future__ import annotations

import operator
from typing import Any, Dict, List, Tuple

from .codec import DUPLICATE, as_float
from .columns import _decode_table

class _Group:
    """Lines whose ``values`` have the same keys, in that order."""

    __slots__ = ("steps", "rows", "lines", "first")

    def __init__(self, step: int, line: int):
        self.steps: List[int] = []
        self.rows: List[Dict[str, Any]] = []
        self.lines: List[int] = []
        self.first = (step, line)  # the smallest (step, line) of the group: where its keys first appear


class Scan:
    """Takes the step lines of a log, in file order (``add``); ``state`` returns what
    ``RunCache`` stores (the caller adds the header, digest and offsets)."""

    def __init__(self, fields: Tuple[str, ...], data_fields: Tuple[Tuple[str, str], ...]):
        self._groups: Dict[tuple, _Group] = {}
        self._line = 0
        self._seen: Dict[int, None] = {}  # every step with a line
        self._reasons: Dict[str, Dict[int, Any]] = {}
        self._flags: Dict[int, Dict[Any, None]] = {}  # step -> its flags
        self._fields = {name: {} for name in fields}  # name -> {step: number}, of a step's first line
        self._data_fields = {pair: {} for pair in data_fields}  # (key, entry) -> {step: number}
        self._entries: Dict[str, List[Tuple[str, Dict[int, Any]]]] = {}  # data key -> [(entry, column)]
        for (key, name), column in self._data_fields.items():
            self._entries.setdefault(key, []).append((name, column))
        self._data_lines: Dict[str, Dict[int, Tuple[int, int]]] = {}
        self._last: Dict[str, Tuple[int, Any]] = {}

    def add(self, step: int, record: Dict[str, Any], at: int, size: int) -> None:
        """One step line (``size`` bytes at offset ``at`` of the log)."""
        if step not in self._seen:
            self._seen[step] = None
            for name, column in self._fields.items():
                value = as_float(record.get(name))
                if value is not None:
                    column[step] = value
        elif not record.get("amends"):  # a second record of the step (see codec.DUPLICATE)
            self._flags.setdefault(step, {})[DUPLICATE] = None
        self.add_values(step, record.get("values"))
        reasons = record.get("reasons")
        if reasons and type(reasons) is dict:
            for key, reason in reasons.items():
                by_step = self._reasons.get(key)
                if by_step is None:
                    by_step = self._reasons[key] = {}
                by_step[step] = reason
        flags = record.get("flags")
        if flags:
            self._flags.setdefault(step, {}).update(dict.fromkeys(flags))
        data = record.get("data")
        if data and type(data) is dict:
            note_lines(self._data_lines, step, data, (at, size))
            for key, structure in data.items():
                last = self._last.get(key)
                if last is None or step >= last[0]:
                    self._last[key] = (step, structure)
                entries = self._entries.get(key)
                if entries is not None:
                    for name, column in entries:
                        entry = as_float(structure.get(name)) if type(structure) is dict else None
                        if entry is not None:
                            column[step] = entry
                        else:  # this line's structure replaces the earlier one, entry and all
                            column.pop(step, None)

    def add_values(self, step: int, values: Any) -> None:
        """The ``values`` of one line of ``step`` (``Run.columns`` passes each merged record's)."""
        self._line += 1
        if values and type(values) is dict:
            signature = tuple(values)
            group = self._groups.get(signature)
            if group is None:
                group = self._groups[signature] = _Group(step, self._line)
            elif step < group.first[0]:
                group.first = (step, self._line)
            group.steps.append(step)
            group.rows.append(values)
            group.lines.append(self._line)

    def state(self) -> Dict[str, Any]:
        """The columns, steps, reasons, flags, fields, line index and last structures, in the
        layout of ``RunCache``'s state (columns as numpy arrays, not yet bytes)."""
        import numpy as np

        steps = np.array(sorted(self._seen), dtype=np.int64)
        flags: Dict[Any, List[int]] = {}
        for step in sorted(self._flags):
            for flag in self._flags[step]:
                flags.setdefault(flag, []).append(step)
        return {
            "columns": self.columns(),
            "steps": steps,
            "reasons": {key: dict(sorted(by_step.items())) for key, by_step in self._reasons.items()},
            "flags": flags,
            "fields": {name: _column(column) for name, column in self._fields.items()},
            "data_fields": {pair: _column(column) for pair, column in self._data_fields.items()},
            "data_lines": self._data_lines,
            "last": self._last,
        }

    def columns(self) -> Dict[str, Tuple[Any, Any]]:
        """key -> (steps, values) as ``Run.columns`` gives them: for each step the value of the
        last line that has one, keys in the order of their first appearance in the merged records
        (the step where a key first appears, then the line, then its place in the line)."""
        import numpy as np


        parts: Dict[str, list] = {}
        first: Dict[str, tuple] = {}
        for signature, group in self._groups.items():
            steps = np.asarray(group.steps, dtype=np.int64)
            lines = np.asarray(group.lines, dtype=np.int64)
            table = list(map(operator.itemgetter(*signature), group.rows))
            for index, (key, column) in enumerate(zip(signature, _decode_table(table, len(signature)))):
                parts.setdefault(key, []).append((steps, column, lines))
                where = (*group.first, index)
                if key not in first or where < first[key]:
                    first[key] = where
        out = {}
        for key in sorted(parts, key=first.__getitem__):
            steps, values, lines = (np.concatenate(x) if len(parts[key]) > 1 else x[0] for x in zip(*parts[key]))
            if len(steps) > 1 and not (np.diff(steps) > 0).all():  # out of order or repeated steps
                order = np.lexsort((lines, steps))
                steps, values = steps[order], values[order]
                keep = np.append(steps[1:] != steps[:-1], True)  # the last line of each step
                steps, values = steps[keep], values[keep]
            steps.flags.writeable = values.flags.writeable = False
            out[key] = (steps, values)
        return out


def note_lines(index: Dict[str, Dict[int, Tuple[int, int]]], step: int, data: Dict[str, Any],
               where: Tuple[int, int]) -> None:
    """Note in ``index`` (data key -> {step: (offset, size)}) that the line at ``where`` holds
    ``step``'s structure of each key of ``data`` (a later line of the step replaces it)."""
    for key in data:
        lines = index.get(key)
        if lines is None:
            lines = index[key] = {}
        lines[step] = where


def _column(by_step: Dict[int, Any]):
    """``{step: number}`` as ``(steps, values)`` arrays in step order."""
    import numpy as np

    steps = np.fromiter(sorted(by_step), dtype=np.int64, count=len(by_step))
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64).reshape(-1)

def _build_columns(records: List[Dict[str, Any]]) -> Dict[str, Tuple[Any, Any]]:
    """``Run.columns`` of records (one per step, in step order): as a finished log's scan builds them."""
    scan = Scan((), ())
    for r in records:
        scan.add_values(r["step"], r.get("values"))
    return scan.columns()
