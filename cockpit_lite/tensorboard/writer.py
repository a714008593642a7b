"""``TensorBoardSink``: every run-log record, written into a TensorBoard event file.

What goes where (one event file per run, in the run's logdir, next to ``cockpit.jsonl``):

* every scalar ``values[key]`` -> TensorBoard's stock scalars, tag ``cockpit/<key>`` (a
  ``simple_value``, which TensorBoard files under the ``scalars`` plugin with data class SCALAR),
  so the Scalars and Time Series dashboards show it;
* 1D histograms (``data["grad_hist_1d"]``) -> also TensorBoard's stock histograms, tag
  ``histograms/<key>`` (a ``HistogramProto`` with the logged edges and counts), so the Histograms and
  Distributions tabs and tbparse's ``histograms`` read them;
* structures and explanations -> tensor summaries of this plugin (``cockpit_lite``, data class
  TENSOR), each a 0-d string tensor holding one JSON document:

  ==========================  =====================  ==========================================
  tag                         step                   JSON
  ==========================  =====================  ==========================================
  ``data/<key>``              the record's step      ``data[key]`` (alpha fit, histograms, ...)
  ``reasons/<quantity>``      the record's step      ``{key: reason}`` for NaN values
  ``flags``                   the record's step      ``["nonfinite_loss", ...]``
  ``overflow``                the record's step      ``{key: "2e+299"}``: finite values beyond float32
  ``events``                  0, 1, 2, ... (count)   a ``skipped`` or ``event`` record
  ``meta``                    0                      ``{"writer": "cockpit-lite", "format": 1}``
  ==========================  =====================  ==========================================

TensorBoard treats a step that is not larger than the last one of a tag as a restart and may drop
what came after it. Every tag above therefore gets non-decreasing steps (a value for an older step
than its tag already holds goes to ``events`` with ``"kind": "late"``, with a warning): an amendment (``alpha`` of
step t, known at t+1) adds keys that step t did not have; when it completes a tag that step t
already wrote (reasons, flags), the merged document is written again at the same step, and the
plugin keeps the last document of each step. Events are numbered by their own counter.

All summaries of one step record go into one event (one call of the writer per record).

Only ``tensorboard`` (its protobufs and ``EventFileWriter``) is used: no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Dict, Optional, Tuple, Union

from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from .names import PLUGIN_NAME, SCALAR_PREFIX
from ..runlog import _clean, decode_number

FILENAME_SUFFIX = ".cockpit_lite"
#: ``data`` keys that are also written as TensorBoard's stock histograms, tag ``histograms/<key>``
NATIVE_HISTOGRAMS = ("grad_hist_1d",)
HISTOGRAM_PREFIX = "histograms/"  # not cockpit/<key>: a failed quantity's NaN scalar has that tag
#: the largest float32: TensorBoard's scalars (simple_value) hold float32, so a finite value beyond this
#: would read as inf; such values also go to the ``overflow`` tag ({key: repr(value)}) at their step
FLOAT32_MAX = 3.4028234663852886e38


def cockpit_metadata(key: str) -> summary_pb2.SummaryMetadata:
    """Metadata of this plugin's tensor summaries; ``content`` names the run-log key they hold."""
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=PLUGIN_NAME, content=json.dumps({"version": 1, "key": key}).encode("utf-8")
        ),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def json_tensor(obj: Any) -> tensor_pb2.TensorProto:
    try:  # most documents are plain JSON already; _clean (NaN -> "NaN", arrays -> lists) otherwise
        text = json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError):
        text = json.dumps(_clean(obj), separators=(",", ":"), allow_nan=False)
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                  string_val=[text.encode("utf-8")])


def as_float(v: Any) -> Optional[float]:
    """A run-log value as a float (NaN for "NaN" strings and None); None when it is no number."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float, str)) or v is None:
        return decode_number(v) if not isinstance(v, str) or v in ("NaN", "Infinity", "-Infinity") else None
    try:  # 0-d tensors and numpy scalars
        return float(v)
    except (TypeError, ValueError):
        return None


class TensorBoardSink:
    """Receives every run-log record (``write``) and puts it into a TensorBoard event file.

    Args:
        logdir: the folder of the event file (the cockpit's logdir, so the run's name in
            TensorBoard is that folder).
        flush_secs: how often pending events reach the disk (TensorBoard then shows them).
    """

    def __init__(self, logdir: Union[str, os.PathLike], flush_secs: float = 5.0):
        self.logdir = os.fspath(logdir)
        self._home = os.path.abspath(self.logdir)  # a removed folder is made again there, whatever the cwd is by then
        self._flush_secs = flush_secs
        self._last: Dict[str, Tuple[int, Any]] = {}  # tag -> (last step, last document) of JSON tags
        self._last_scalar: Dict[str, int] = {}  # tag -> last step of scalar tags
        self._last_histogram: Dict[str, int] = {}  # tag -> last step of stock histogram tags
        self._events = 0
        self._warned: set = set()
        self.closed = False
        self._open()

    def _open(self) -> None:
        """A new event file (the folder made where missing), marked as a cockpit run even before (or without)
        any structured data."""
        self._writer = EventFileWriter(self._home, max_queue_size=1000, flush_secs=self._flush_secs,
                                       filename_suffix=FILENAME_SUFFIX)
        self._described: set = set()  # tags whose metadata was written in this file (TensorBoard reads the first)
        self._summary("meta", 0, json_tensor({"writer": "cockpit-lite", "format": 1}), cockpit_metadata("meta"), None)
        self._writer.flush()

    def _reopen_if_removed(self) -> None:
        """Open a new event file where this one was removed (``rm -rf logdir`` mid-run: its writes would reach no
        file): one ``stat`` per record, a warning once. The records before are lost to
        TensorBoard (the run log keeps them where it could, ``runlog/writer.py``)."""
        old = self._writer._file_name
        try:
            os.stat(old)
            return
        except FileNotFoundError:
            pass
        except OSError:
            return
        try:
            # the old writer's thread opens its file by name for every write: with the folder back, what it still
            # holds (records from before the removal) lands in a file of its old name, removed after it closes
            os.makedirs(os.path.dirname(old), exist_ok=True)
            self._writer.close()
        except Exception:  # noqa: BLE001 - its flush may fail (the thread stopped on the missing file)
            pass
        try:
            os.remove(old)
        except OSError:
            pass
        self._open()
        if "removed" not in self._warned:
            self._warned.add("removed")
            warnings.warn(f"TensorBoardSink: the event file in {self.logdir} was removed during the run; a new one "
                          "was started, and TensorBoard shows the records from here on", RuntimeWarning, stacklevel=3)

    @property
    def path(self) -> str:
        return self._writer._file_name

    # -- the sink protocol ----------------------------------------------------------------------
    def write(self, record: Dict[str, Any]) -> None:
        if self.closed:
            raise RuntimeError("this TensorBoardSink is closed")
        kind = record.get("type")
        self._reopen_if_removed()
        if kind == "step":
            self._write_step(record)
        elif kind in ("skipped", "event"):
            self._summary("events", self._events, json_tensor(record), cockpit_metadata("events"),
                          wall=record.get("wall"))
            self._events += 1
        # header/footer (not handed to sinks today) and unknown record types carry no series

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()

    # -- internals ------------------------------------------------------------------------------
    def _write_step(self, record: Dict[str, Any]) -> None:
        """All of a step record's summaries in one event (one writer call, one lock, per record)."""
        step = int(record["step"])
        wall = record.get("wall")
        values = []
        overflow: Dict[str, str] = {}
        for key, v in record.get("values", {}).items():
            x = as_float(v)
            if x is None:
                self._warn_once(f"value:{key}", f"cockpit-lite TensorBoardSink: value of {key!r} is not a number "
                                                f"({type(v).__name__}); not written as a scalar")
                continue
            tag = SCALAR_PREFIX + key
            last = self._last_scalar.get(tag)
            if last is not None and step < last:  # see the module docstring: would read as a restart
                self._late(tag, step, {key: v if isinstance(v, (str, int, float)) else x}, wall)
                continue
            self._last_scalar[tag] = step
            if math.isfinite(x) and abs(x) > FLOAT32_MAX:  # simple_value is float32: it would read as inf
                overflow[key] = repr(x)
            # simple_value: the stock scalar encoding (both loaders file it under plugin "scalars")
            values.append(summary_pb2.Summary.Value(tag=tag, simple_value=x))
        if overflow:  # the exact values, as text, for the tab to show next to the float32 infinity
            values.append(self._json_tag("overflow", step, overflow, wall, merge=_merge_dicts))
        for key, obj in record.get("data", {}).items():
            values.append(self._json_tag(f"data/{key}", step, obj, wall, merge=_replace))
            if key in NATIVE_HISTOGRAMS:
                values.append(self._histogram(HISTOGRAM_PREFIX + key, step, obj))
        by_quantity: Dict[str, Dict[str, str]] = {}
        for key, reason in record.get("reasons", {}).items():
            by_quantity.setdefault(key.split("/", 1)[0], {})[key] = str(reason)
        for name, reasons in by_quantity.items():
            values.append(self._json_tag(f"reasons/{name}", step, reasons, wall, merge=_merge_dicts))
        if record.get("flags"):
            values.append(self._json_tag("flags", step, sorted(set(record["flags"])), wall, merge=_merge_lists))
        values = [v for v in values if v is not None]
        if values:
            self._add(step, summary_pb2.Summary(value=values), wall)

    def _json_tag(self, tag: str, step: int, doc: Any, wall, merge) -> Optional[summary_pb2.Summary.Value]:
        last = self._last.get(tag)
        if last is not None and step < last[0]:
            # an amendment older than what this tag already holds: TensorBoard would read it as a
            # restart and drop later steps, so it goes to the events stream instead
            self._late(tag, step, doc, wall)
            return None
        if last is not None and step == last[0]:
            doc = merge(last[1], doc)
        self._last[tag] = (step, doc)
        return self._value(tag, json_tensor(doc), lambda: cockpit_metadata(tag))

    def _histogram(self, tag: str, step: int, hist: Any) -> Optional[summary_pb2.Summary.Value]:
        """A 1D histogram structure as TensorBoard's stock histogram (Histograms and Distributions
        tabs, tbparse's ``histograms``); None where it has no bins or would go back in steps (the
        JSON document under ``data/<key>`` keeps it then)."""
        proto = histogram_proto(hist)
        last = self._last_histogram.get(tag)
        if proto is None or (last is not None and step <= last):
            return None
        self._last_histogram[tag] = step
        return summary_pb2.Summary.Value(tag=tag, histo=proto)

    def _late(self, tag: str, step: int, payload: Any, wall) -> None:
        last = self._last_scalar.get(tag, self._last.get(tag, (None,))[0])
        self._warn_once(f"order:{tag}", f"cockpit-lite TensorBoardSink: {tag!r} for step {step} arrived after "
                                        f"step {last}; it is kept in the 'events' tag")
        self.write({"type": "event", "level": "info", "kind": "late", "tag": tag, "step": step,
                    "message": f"{tag} of step {step} arrived after step {last}", "payload": payload, "wall": wall})

    def _summary(self, tag: str, step: int, tensor, metadata, wall) -> None:
        self._add(step, summary_pb2.Summary(value=[self._value(tag, tensor, lambda: metadata)]), wall)

    def _value(self, tag: str, tensor, make_metadata) -> summary_pb2.Summary.Value:
        return summary_pb2.Summary.Value(tag=tag, tensor=tensor, metadata=self._metadata(tag, make_metadata))

    def _metadata(self, tag: str, make):
        if tag in self._described:
            return None
        self._described.add(tag)
        return make()

    def _add(self, step: int, summary, wall) -> None:
        wall = float(wall) if isinstance(wall, (int, float)) and math.isfinite(wall) else _now()
        self._writer.add_event(event_pb2.Event(wall_time=wall, step=step, summary=summary))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def histogram_proto(hist: Any) -> Optional[summary_pb2.HistogramProto]:
    """``{"edges": [k+1 floats], "counts": [k numbers]}`` as a ``HistogramProto``: bucket i spans
    edges[i]..edges[i+1], ``bucket_limit`` = edges[1:]. TensorBoard drops the empty buckets at both
    ends and takes the left edge of the first remaining bucket from ``min``, the right edge of the last
    from ``max``: they are those buckets' edges (the narrowest range the counts allow for the values).
    ``sum``/``sum_squares`` are not known from binned counts: NaN. None when the structure has no bins."""
    if not isinstance(hist, dict):
        return None
    edges, counts = hist.get("edges"), hist.get("counts")
    if not isinstance(edges, list) or not isinstance(counts, list) or not counts or len(edges) != len(counts) + 1:
        return None
    try:
        edges = [float(e) for e in edges]
        counts = [float(c) for c in counts]
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(x) for x in edges + counts):
        return None
    filled = [i for i, c in enumerate(counts) if c > 0]
    lo, hi = (edges[filled[0]], edges[filled[-1] + 1]) if filled else (edges[0], edges[-1])
    return summary_pb2.HistogramProto(min=lo, max=hi, num=sum(counts), sum=math.nan,
                                      sum_squares=math.nan, bucket_limit=edges[1:], bucket=counts)


def _replace(old, new):
    return new


def _merge_dicts(old, new):
    return {**old, **new} if isinstance(old, dict) and isinstance(new, dict) else new


def _merge_lists(old, new):
    return sorted(set(old) | set(new)) if isinstance(old, list) and isinstance(new, list) else new


def _now() -> float:
    import time

    return time.time()
