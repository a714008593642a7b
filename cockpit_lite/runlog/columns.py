"""Columns of a run log: ``(steps, values)`` numpy arrays per key, built once per read."""

from __future__ import annotations

from typing import Any, Iterable, List, Optional, Sequence, Tuple

from .codec import decode_number, entry_number




def _entry_column(pairs: Iterable[Tuple[int, Any]], name: str):
    """``(steps, values)`` of the numeric entry ``name`` of the dicts in ``pairs``
    (``[(step, dict), ...]``), over those that hold one."""
    import numpy as np

    hits = [(s, v) for s, v in ((s, entry_number(d, name)) for s, d in pairs) if v is not None]
    return (np.array([h[0] for h in hits], dtype=np.int64).reshape(-1),
            np.array([h[1] for h in hits], dtype=np.float64).reshape(-1))


def _copies(column: Optional[Tuple[Any, Any]]):
    """Writable copies of a stored ``(steps, values)`` column (empty arrays for None)."""
    import numpy as np

    if column is None:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    return np.array(column[0], dtype=np.int64), np.array(column[1], dtype=np.float64)

def _decode_column(column: Sequence[Any]):
    """``[decode_number(v) for v in column]`` as float64."""
    import numpy as np

    return np.fromiter(map(decode_number, column), dtype=np.float64, count=len(column))


def _decode_table(rows: List[Any], width: int):
    """The ``width`` columns of ``rows`` (tuples of ``width`` values; bare values when ``width``
    is 1) as float64 arrays, each value read as ``decode_number`` reads it. One numpy call for
    the whole table: numpy converts numbers, None, and the strings that ``encode_number`` writes
    exactly as ``decode_number`` does; any other string or object is decoded value by value."""
    import numpy as np

    try:
        table = np.array(rows, dtype=np.float64)
        if table.shape == ((len(rows), width) if width > 1 else (len(rows),)):
            return list(table.T.copy()) if width > 1 else [table]
    except (ValueError, TypeError, OverflowError):
        pass
    return [_decode_column(col) for col in (zip(*rows) if width > 1 else (rows,))]
