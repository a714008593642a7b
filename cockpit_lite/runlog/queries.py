"""What a read run answers: ``series``, ``steps``, ``reasons``, ``data``, ``flagged``, ``field``, ... (the
mixin ``RunQueries`` of ``Run``; reading and refreshing the file is ``reader.py``). A run read from a cache
answers them from its columns without building its records."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple

from ..gc_pause import gc_paused
from .columns import _copies, _entry_column
from .keys import is_known, unknown_key
from .scan import _build_columns

if TYPE_CHECKING:
    import numpy as np
    import pandas

    Series = Tuple[np.ndarray, np.ndarray]


class RunQueries:
    # -- access --------------------------------------------------------------------------------
    def keys(self) -> List[str]:
        """Every scalar key that appears in some record (``grad_norm``, ``grad_norm/fc.weight``, ...),
        in the order of first appearance."""
        return list(self.columns())

    def steps(self) -> "np.ndarray":
        """The steps of the step records, in order, as a numpy array."""
        import numpy as np

        if self._cached is not None:
            return self._cached.steps.copy()
        if self._steps is None:  # the advisor's rules ask for it several times per plot
            self._steps = np.fromiter((r["step"] for r in self._records), dtype=np.int64, count=len(self._records))
        return self._steps.copy()

    def series(self, key: str, *, start: Optional[int] = None, stop: Optional[int] = None) -> "Series":
        """``(steps, values)`` as numpy arrays over the records that hold ``key``.

        Values that could not be computed are NaN (``reasons(key)`` says why). A quantity's key
        with no values in this run gives empty arrays; a key that is in no record and belongs to
        no quantity (a typo) raises ``KeyError`` suggesting the close matches (``runlog/keys``).
        """
        import numpy as np

        columns = self.columns()
        column = columns.get(key)
        if column is None:
            if not is_known(key, self.header):  # a typo, not a quantity without values
                raise unknown_key(key, columns)
            return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
        steps, values = column
        lo = 0 if start is None else int(np.searchsorted(steps, start, side="left"))
        hi = len(steps) if stop is None else int(np.searchsorted(steps, stop, side="left"))
        hi = max(lo, hi)
        return np.array(steps[lo:hi], dtype=np.int64), np.array(values[lo:hi], dtype=np.float64)

    def has(self, key: str) -> bool:
        """Whether some step record holds the scalar ``key`` (a value, or NaN with a reason): ask this
        where an absent key is expected, since ``series`` raises ``KeyError`` for a key of no quantity."""
        return key in self.columns()

    def columns(self) -> Dict[str, "Series"]:
        """Every scalar key -> ``(steps, values)`` numpy arrays (read-only; ``series`` returns copies).

        Built in one pass when first asked for after a read, by ``runlog/scan.Scan``: records with
        the same keys (most of a run's records) are read together, one C-level ``itemgetter`` per
        record, and converted as ``decode_number`` would, in one numpy call per group (``_decode_table``).
        """
        if self._columns is None:
            with gc_paused():  # it would rescan every record for each few hundred new tuples
                self._columns = _build_columns(self.records)
        return self._columns

    def reasons(self, key: str) -> Dict[int, str]:
        """Step -> reason, for the steps where ``key`` was recorded as not computable."""
        if self._cached is not None:
            return dict(self._cached.reasons.get(key, {}))
        return {r["step"]: r["reasons"][key] for r in self._records if key in r.get("reasons", {})}

    def data(self, key: str) -> List[Tuple[int, Any]]:
        """``[(step, structure), ...]`` for a structured quantity (histograms, fit details)."""
        if self._cached is not None:
            try:
                return list(self._cached.data(key))
            except Exception:  # a noted line that does not read back: decode the log instead
                self._cached = None
                self._redecode()
        return list(self.data_index().get(key, ()))

    def data_keys(self) -> List[str]:
        """The ``data`` keys that some step record holds, sorted."""
        if self._cached is not None:
            return sorted(self._cached.data_keys())
        return sorted(self.data_index())

    def data_index(self) -> Dict[str, List[Tuple[int, Any]]]:
        """Every ``data`` key -> ``[(step, structure), ...]``, built in one pass over the records
        (a plot asks for several keys; the cache stores each key apart). Do not modify it."""
        if self._data_index is None:
            index: Dict[str, List[Tuple[int, Any]]] = {}
            for r in self.records:
                d = r.get("data")
                if d and isinstance(d, dict):
                    step = r["step"]
                    for k, v in d.items():
                        index.setdefault(k, []).append((step, v))
            self._data_index = index
        return self._data_index

    def flagged(self, flag: str) -> List[int]:
        """The steps whose records carry ``flag`` (``nonfinite_loss``, ...), in order."""
        if self._cached is not None:
            return list(self._cached.flags.get(flag, ()))
        return [r["step"] for r in self._records if flag in r.get("flags", ())]

    def field(self, name: str) -> "Series":
        """``(steps, values)`` numpy arrays of a numeric top-level field of the step records
        (``samples``, ``backward_passes``, ``wall``) over the records that hold it."""
        if self._cached is not None and name in self._cached.fields:
            return _copies(self._cached.fields[name])
        if (None, name) not in self._entries:  # the cache writer and the advisor both ask
            self._entries[None, name] = _entry_column(((r["step"], r) for r in self.records), name)
        return _copies(self._entries[None, name])

    def data_field(self, key: str, name: str) -> "Series":
        """``(steps, values)`` numpy arrays of a numeric entry of ``key``'s structures (``energy``'s
        ``steps``, ``hess_max_ev``'s ``converged`` as 0/1), over the structures that hold it;
        a run read from its cache answers those of ``RunCache.DATA_FIELDS`` without the structures."""
        if self._cached is not None and (key, name) in self._cached.data_fields:
            return _copies(self._cached.data_fields[key, name])
        if (key, name) not in self._entries:  # the cache writer and the energy panel both ask
            self._entries[key, name] = _entry_column(self.data(key), name)
        return _copies(self._entries[key, name])

    def last_data(self, key: str) -> Optional[Tuple[int, Any]]:
        """``(step, structure)`` of the last step that holds ``key`` in its ``data`` (None if none)."""
        if self._cached is not None:
            return self._cached.last.get(key)
        for r in reversed(self._records):
            if key in r.get("data", {}):
                return r["step"], r["data"][key]
        return None

    def to_pandas(self, keys: Optional[Iterable[str]] = None, *, fields: bool = True) -> "pandas.DataFrame":
        """A pandas DataFrame, one row per step, amendments applied, NaN as float
        (``cockpit_lite.frames.to_pandas``: which columns; pandas is optional)."""
        from ..frames import to_pandas

        return to_pandas(self, keys, fields=fields)

    def _repr_html_(self) -> str:
        """Jupyter's view of a run: a small summary table (``cockpit_lite.notebook.run_html``)."""
        from ..notebook import run_html

        return run_html(self)
