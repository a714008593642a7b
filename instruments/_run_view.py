"""``RunView``: a ``Run`` restricted to a step range, with memoized and batched reads."""

from __future__ import annotations

import operator
from typing import Any, Dict, Iterable, List, Optional, Tuple


def _to_float(table):
    """An object array of logged numbers ("NaN"/"Infinity" strings included) as float64."""
    import numpy as np

    try:
        return table.astype(np.float64)
    except (TypeError, ValueError):  # an unexpected string or null: the reader's own rule, one by one
        from cockpit_lite.runlog import decode_number

        return np.vectorize(decode_number, otypes=[np.float64])(table)


class RunView:
    """A ``Run`` restricted to steps ``[start, stop)``, with memoized reads.

    Instruments receive this instead of the ``Run``; it has the same read methods.
    """

    def __init__(self, run, start: Optional[int] = None, stop: Optional[int] = None, label: Optional[str] = None):
        self.run = run
        self.start = start
        self.stop = stop
        self.label = label or _run_label(run)
        self._series: Dict[str, Any] = {}
        self._data: Dict[str, Any] = {}
        self._keys: Optional[List[str]] = None

    @property
    def header(self) -> Dict[str, Any]:
        return getattr(self.run, "header", {}) or {}

    @property
    def skipped(self) -> List[Dict[str, Any]]:
        return [r for r in getattr(self.run, "skipped", []) if self._in_range(int(r.get("step", 0)))]

    def _in_range(self, step: int) -> bool:
        return (self.start is None or step >= self.start) and (self.stop is None or step < self.stop)

    def keys(self) -> List[str]:
        if self._keys is None:
            if hasattr(self.run, "keys"):
                self._keys = list(self.run.keys())
            else:
                seen: Dict[str, None] = {}
                for r in getattr(self.run, "records", None) or []:
                    seen.update(dict.fromkeys(r.get("values", ())))
                self._keys = list(seen)
        return self._keys

    def series(self, key: str):
        if key not in self._series:
            try:
                self._series[key] = self.run.series(key, start=self.start, stop=self.stop)
            except KeyError:  # a key in no record and of no quantity (Run.series): nothing to draw
                import numpy as np

                self._series[key] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
        return self._series[key]

    def prefetch(self, keys: Iterable[str], data_keys: Iterable[str] = ()) -> None:
        """Read several keys' series (and structures) in one pass over the records; ``series`` and
        ``data`` then return them. The dashboard does this for every key its instruments read,
        which is what keeps a 100,000-step log quick to plot.

        Records with the same set of keys (most of a run's records) are read together with one
        C-level ``itemgetter`` per record, and converted to numbers by numpy in one go. A
        ``cockpit_lite.Run`` keeps such columns itself (``Run.columns``): its series are taken from there.
        """
        import numpy as np

        wanted = [k for k in dict.fromkeys(keys) if k not in self._series]
        data_wanted = [k for k in dict.fromkeys(data_keys) if k not in self._data]
        if hasattr(self.run, "columns"):  # a Run: columns and structures without its records
            for k in wanted:  # its structures are read when drawn: a cached Run decodes those lines then
                self.series(k)
            return
        records = getattr(self.run, "records", None)
        if records is None or not (wanted or data_wanted):
            return
        start, stop = self.start, self.stop
        groups: Dict[tuple, Tuple[list, list]] = {}
        found_data: Dict[str, list] = {k: [] for k in data_wanted}
        for r in records:
            s = r["step"]
            if (start is not None and s < start) or (stop is not None and s >= stop):
                continue
            if data_wanted:
                d = r.get("data")
                if d:
                    for k in data_wanted:
                        if k in d:
                            found_data[k].append((s, d[k]))
            vals = r.get("values")
            if not vals or not wanted:
                continue
            signature = tuple(vals)
            group = groups.get(signature)
            if group is None:
                group = groups[signature] = ([], [])
            group[0].append(s)
            group[1].append(vals)
        self._data.update(found_data)
        chunks: Dict[str, List[Tuple[Any, Any]]] = {k: [] for k in wanted}
        for signature, (steps, rows) in groups.items():
            present = [k for k in wanted if k in rows[0]]
            if not present:
                continue
            getter = operator.itemgetter(*present)
            table = np.array([getter(v) for v in rows] if len(present) > 1 else [(getter(v),) for v in rows],
                             dtype=object).reshape(len(rows), len(present))
            numbers = _to_float(table)
            steps_arr = np.asarray(steps, dtype=np.int64)
            for j, k in enumerate(present):
                chunks[k].append((steps_arr, numbers[:, j]))
        for k in wanted:
            parts = chunks[k]
            if not parts:
                self._series[k] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
            elif len(parts) == 1:
                self._series[k] = parts[0]
            else:
                steps_all = np.concatenate([p[0] for p in parts])
                order = np.argsort(steps_all, kind="stable")
                self._series[k] = (steps_all[order], np.concatenate([p[1] for p in parts])[order])

    def data(self, key: str) -> List[Tuple[int, Any]]:
        if key not in self._data:
            self._data[key] = [(s, d) for s, d in self.run.data(key) if self._in_range(s)]
        return self._data[key]

    def reasons(self, key: str) -> Dict[int, str]:
        return {s: r for s, r in self.run.reasons(key).items() if self._in_range(s)}

    def data_field(self, key: str, name: str):
        """``(steps, values)`` of a numeric entry of ``key``'s structures in range (``energy``'s
        ``steps``): a ``cockpit_lite.Run`` read from its cache answers without decoding them."""
        import numpy as np

        if key in self._data or not hasattr(self.run, "data_field"):
            return _entry_column(self.data(key), name)
        steps, values = self.run.data_field(key, name)
        keep = np.ones(len(steps), dtype=bool)
        if self.start is not None:
            keep &= steps >= self.start
        if self.stop is not None:
            keep &= steps < self.stop
        return steps[keep], values[keep]

    def last_data(self, key: str) -> Optional[Tuple[int, Any]]:
        """``(step, structure)`` of the last step in range that holds ``key`` (None if none)."""
        if key not in self._data and hasattr(self.run, "last_data"):
            last = self.run.last_data(key)
            if last is None or self._in_range(last[0]):
                return last
        found = self.data(key)
        return found[-1] if found else None

    def has_finite(self, key: str) -> bool:
        import numpy as np

        _, values = self.series(key)
        return bool(values.size and np.isfinite(values).any())

    def subkeys(self, prefix: str) -> List[str]:
        """Keys ``prefix/<part>`` in the run (per-parameter values, groups), in log order."""
        return [k for k in self.keys() if k.startswith(prefix + "/")]


def _entry_column(pairs, name: str):
    """``(steps, values)`` of the numeric entry ``name`` of the structures in ``pairs`` (``[(step, dict)]``),
    over those that hold one: what ``Run.data_field`` answers, for a view's own reads."""
    import numpy as np

    from cockpit_lite.runlog.codec import entry_number

    hits = [(s, v) for s, v in ((s, entry_number(d, name)) for s, d in pairs) if v is not None]
    return (np.array([h[0] for h in hits], dtype=np.int64).reshape(-1),
            np.array([h[1] for h in hits], dtype=np.float64).reshape(-1))


def _run_label(run) -> str:
    logdir = getattr(run, "logdir", None)
    return getattr(logdir, "name", None) or str(logdir or "run")


def as_view(run, start=None, stop=None) -> RunView:
    return run if isinstance(run, RunView) else RunView(run, start, stop)
