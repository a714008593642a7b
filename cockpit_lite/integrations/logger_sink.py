"""``ScalarWriterSink``: a cockpit sink that copies each step's scalar values into a framework's
TensorBoard writer (anything with ``add_scalar(tag, value, global_step)``, e.g. the
``SummaryWriter`` of Lightning's ``TensorBoardLogger``).

Tags are ``cockpit/<key>`` as in cockpit-lite's own TensorBoard writer. The TensorBoard step is the
cockpit's step plus ``step_offset`` (the framework's global step when the cockpit was attached), so
the values line up with what the framework logs in the same run, also after a resume. NaN values are
written as NaN (the reason is in the run log); amendments (``alpha`` of step t, known at t+1) are
written at their own step. TensorBoard reads a step that is not larger than the last one of a tag as
a restart, so a value older than its tag's last step is left out here (it stays in the run log).
Structured data (histograms, fits) stays in the run log.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List


class ScalarWriterSink:
    """Receives every run-log record (``write``) and adds its scalar values to ``writers``.

    Args:
        writers: objects with ``add_scalar(tag, value, global_step)``.
        step_offset: added to the record's step.
        prefix: tag prefix.
    """

    def __init__(self, writers: Iterable[Any], step_offset: int = 0, prefix: str = "cockpit/"):
        self.writers: List[Any] = list(writers)
        self.step_offset = int(step_offset)
        self.prefix = prefix
        self.closed = False
        self._last: Dict[str, int] = {}  # tag -> last step written

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("type") != "step":
            return
        step = self.step_offset + int(record["step"])
        for key, value in (record.get("values") or {}).items():
            number = _as_float(value)
            tag = self.prefix + key
            if number is None or step < self._last.get(tag, step):
                continue
            self._last[tag] = step
            for writer in self.writers:
                writer.add_scalar(tag, number, step)

    def close(self) -> None:
        """Flush the writers (they belong to the framework, which closes them)."""
        self.closed = True
        for writer in self.writers:
            flush = getattr(writer, "flush", None)
            if flush is not None:
                flush()


def _as_float(value: Any):
    """A run-log value as a float (NaN for the run log's "NaN"/None); None when it is no number."""
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value)
    if value is None:
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
