"""``MetricsSink``: the shared part of the tracker sinks: a step record -> ``{prefix + key: float}``.

Subclasses implement ``emit(metrics, step)`` (and optionally ``flush()``). What they receive:

* step records only (amendments included: ``alpha`` of step t arrives with step t+1's record, at its
  own step t); skipped steps and events stay in the run log;
* numbers as floats; a value logged as NaN (its reason is in the run log) is sent as NaN;
* per key, steps only increase: a value older than the last one sent for its key is left out
  (TensorBoard reads a smaller step as a restart; W&B refuses it); it stays in the run log;
* ``step`` = the record's step + ``step_offset``.

A sink that raises is detached by the cockpit (warned once; the run log is unaffected).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

from .keys import KeySpec, key_filter, parameter_names


class MetricsSink:
    """Base of the tracker sinks. Args: ``keys`` (see :mod:`cockpit_lite.sinks.keys`), ``prefix``
    (added to every key), ``step_offset`` (added to every step)."""

    def __init__(self, keys: KeySpec = "totals", prefix: str = "cockpit/", step_offset: int = 0):
        self._wanted = key_filter(keys)
        self.prefix = prefix
        self.step_offset = int(step_offset)
        self.parameter_names: frozenset = frozenset()
        self.closed = False
        self._last: Dict[str, int] = {}

    def open_run(self, header: Dict[str, Any]) -> None:
        """Called by the cockpit with the run's header: learns the parameter names ("totals")."""
        self.parameter_names = parameter_names(header)

    def metrics(self, record: Dict[str, Any]) -> Optional[Dict[str, float]]:
        """The metrics of a record (None when it has none to send)."""
        if record.get("type") != "step":
            return None
        step = self.step_offset + int(record["step"])
        out = {}
        for key, value in (record.get("values") or {}).items():
            number = as_float(value)
            if number is None or not self._wanted(key, self.parameter_names):
                continue
            if step < self._last.get(key, step):
                continue
            self._last[key] = step
            out[self.prefix + key] = number
        return out or None

    def write(self, record: Dict[str, Any]) -> None:
        metrics = self.metrics(record)
        if metrics:
            self.emit(metrics, self.step_offset + int(record["step"]))

    def emit(self, metrics: Dict[str, float], step: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True
        self.flush()


def require(module: str, sink: str):
    """Import the tracker's package ``module`` for ``sink``, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{sink} needs {module}: pip install {module}") from err


def as_float(value: Any) -> Optional[float]:
    """A run-log value as a float (NaN for the run log's "NaN"/None); None when it is no number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value)
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
