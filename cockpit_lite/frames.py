"""``Run.to_pandas()``: the run log as a pandas DataFrame, one row per step.

``pd.read_json(lines=True)`` on ``cockpit.jsonl`` gives one row per line: a step amended later
(``alpha`` of step t is written at step t+1, GPU energy once its counter updated) appears twice, and
values that could not be computed are the strings ``"NaN"``. This frame is built from the reader
(``cockpit_lite.load``), which merges amendments into their step and decodes those strings:

* index ``step`` (int64): the step records, in order (skipped steps have no row: ``Run.skipped``);
* one float64 column per scalar key of ``values`` (``loss``, ``grad_norm``, ``grad_norm/<param>``,
  ...), NaN where the step has no value or it could not be computed (``Run.reasons(key)`` says why);
* the numeric top-level fields ``wall`` (Unix time the record was written), ``backward_passes`` and
  ``samples`` / ``samples_local`` (float64, NaN where absent), when some record has them.

Structures (``data``: histograms, fit details) are not columns; read them with ``Run.data(key)``.
pandas is optional: it is imported here, on first use.
"""

from __future__ import annotations

from typing import Iterable, Optional

FIELDS = ("wall", "backward_passes", "samples", "samples_local")


def _pandas():
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("Run.to_pandas() needs pandas, which is not installed: pip install pandas") from None
    return pd


def to_pandas(run, keys: Optional[Iterable[str]] = None, *, fields: bool = True):
    """The step records of ``run`` as a DataFrame (see the module's docstring).

    ``keys``: the scalar keys to include (default: every key, in order of first appearance); a key
    no record holds raises ``KeyError`` as ``Run.series`` does (a quantity without values: a NaN column).
    ``fields``: also the columns ``wall``, ``backward_passes``, ``samples`` (``samples_local``).
    """
    import numpy as np

    pd = _pandas()
    steps = run.steps()
    index = pd.Index(steps, name="step")
    columns = run.columns()
    names = list(columns) if keys is None else list(keys)
    out = {}
    for key in names:
        if key in columns:
            key_steps, values = columns[key]
        else:
            key_steps, values = run.series(key)  # KeyError for a typo, empty for a known quantity
        out[key] = _spread(np, steps, key_steps, values)
    if fields:
        for name in FIELDS:
            field_steps, values = run.field(name)
            if len(field_steps):
                out[name] = _spread(np, steps, field_steps, values)
    return pd.DataFrame(out, index=index, columns=list(out))


def _spread(np, steps, key_steps, values):
    """``values`` (at ``key_steps``, a sorted subset of ``steps``) on every step, NaN elsewhere."""
    column = np.full(len(steps), np.nan, dtype=np.float64)
    if len(key_steps):
        column[np.searchsorted(steps, key_steps)] = np.asarray(values, dtype=np.float64)
    return column
