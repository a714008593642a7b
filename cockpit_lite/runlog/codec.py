"""The run log's format: its records, how numbers are stored (non-finite as "NaN", "Infinity",
"-Infinity", so the file is standard JSON), how a line is decoded (``orjson`` when installed, with
``json``'s results and errors), and the errors a reader reports. See ``cockpit_lite/runlog/__init__.py``
for the layout of a log."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Union

FORMAT = "cockpit-lite-log"
VERSION = 1
LOG_NAME = "cockpit.jsonl"
#: the flag the reader puts on a step that has a second record which is not an amendment (two writers, a
#: step counter that went back): the records are merged, the later line winning, and the reader warns
DUPLICATE = "duplicate_record"


class CorruptLogError(ValueError):
    """The log cannot be read as one run (no header, a second header, a version this release does not
    read), or (``strict=True``) a line other than a torn last line is not a valid record."""


class BadRecordError(ValueError):
    """One line that is not a valid record: it is skipped and reported (``Run.bad_lines``)."""


_INT64 = 1 << 63
_PLAIN_VALUES = frozenset((float, str, type(None)))  # what a logged value is: a number, "NaN", None


def _check_step_number(record: Dict[str, Any]) -> int:
    if "step" not in record:
        raise BadRecordError(f"{record.get('type')} record without 'step'")
    step = record["step"]
    if type(step) is not int or not -_INT64 <= step < _INT64:
        raise BadRecordError(f"'step' is {_short(step)}, not an integer step")
    return step


def _check_step_record(record: Dict[str, Any]) -> int:
    """The step of a step record whose parts have the types the reader merges (else BadRecordError)."""
    step = _check_step_number(record)
    values = record.get("values")
    if values is not None:
        if type(values) is not dict:
            raise BadRecordError(f"'values' is {_short(values)}, not an object")
        if not _PLAIN_VALUES.issuperset(map(type, values.values())):
            for key, v in values.items():
                kind = type(v)
                if kind is int or kind is bool:
                    if not -_MAX_FLOAT < v < _MAX_FLOAT:
                        raise BadRecordError(f"value of {key!r} is an integer too large for a float")
                elif kind not in _PLAIN_VALUES:
                    raise BadRecordError(f"value of {key!r} is {_short(v)}, not a number")
    for part in ("reasons", "data"):
        if part in record and type(record[part]) is not dict:
            raise BadRecordError(f"{part!r} is {_short(record[part])}, not an object")
    flags = record.get("flags")
    if flags is not None and (type(flags) is not list or not all(type(f) is str for f in flags)):
        raise BadRecordError(f"'flags' is {_short(flags)}, not a list of names")
    return step


_MAX_FLOAT = 2 ** 1024  # integers beyond do not convert to float64


def _short(value: Any) -> str:
    """``repr(value)`` cut short, for a message."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10 ** 30 else f"an integer of {len(str(abs(value)))} digits"
    return text if len(text) <= 60 else text[:57] + "..."




def encode_number(x: float) -> Union[float, str]:
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def decode_number(x: Any) -> float:
    """A logged value as a float: the strings ``encode_number`` writes ("NaN", "Infinity",
    "-Infinity") as what they name, None and any other string that is not a number as NaN. The
    same as numpy's conversion to float64, which ``_decode_table`` relies on."""
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    if x is None:
        return math.nan
    try:
        return float(x)
    except (OverflowError, TypeError):  # the reader refuses such lines; a value built by hand
        return math.nan


def _clean(obj: Any) -> Any:
    """Make ``obj`` JSON-safe: non-finite floats become strings, tuples lists."""
    if isinstance(obj, float):
        return encode_number(obj)
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return _clean(obj.tolist())
    return obj


_DECODER = json.JSONDecoder()  # the settings of json.loads
_JSON_SPACE = " \t\n\r"


def _text_lines(chunk: bytes, end: int) -> Optional[List[str]]:
    """The complete lines of ``chunk[:end]`` as text, decoded in one call (None if it is not UTF-8:
    each line is then decoded on its own, which finds the bad one)."""
    try:
        return chunk[:end].decode("utf-8").split("\n")[:-1]
    except UnicodeDecodeError:
        return None


try:  # optional: not a dependency, only faster
    from orjson import JSONDecodeError as _OrjsonError, loads as _orjson_loads
except ImportError:  # pragma: no cover - depends on the environment
    _orjson_loads = None


def _decode_line(raw: bytes, text: Optional[str] = None) -> Any:
    """``json.loads(raw)``, faster. orjson, where installed, decodes the standard JSON that the
    writer produces to the same objects (one difference: integers beyond 64 bits become floats with
    orjson, whole with json; the writer writes none: steps, counts and sizes are far smaller); else the scanner of ``json`` runs on the line's text
    directly (``text``: already decoded from UTF-8 with the rest of the chunk, see ``_text_lines``;
    None: decoded here). Whatever those do not accept as it stands (NaN literals, huge integers,
    leading whitespace, a byte-order mark, garbage) goes to ``json.loads(raw)``, so the result and
    any error are exactly those of json.loads."""
    if _orjson_loads is not None:
        try:
            return _orjson_loads(raw)
        except _OrjsonError:
            pass
    if text is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None  # json.loads names the error
    if text is not None:
        try:
            record, end = _DECODER.raw_decode(text)
            if end == len(text) or not text[end:].strip(_JSON_SPACE):
                return record
        except ValueError:
            pass
    return json.loads(raw)


_NUMBER = (int, float)  # bool included: a flag reads as 0/1


def entry_number(structure: Any, name: str) -> Optional[float]:
    """The numeric entry ``name`` of a ``data`` structure as a float, or None where it holds none. A dotted
    ``name`` reaches into nested dicts (``"total.error_j"``); there the strings ``encode_number`` writes count
    as the numbers they name (an error bound logged as "NaN" is a value: the estimate has none)."""
    if "." not in name:
        return as_float(structure.get(name)) if isinstance(structure, dict) else None
    for part in name.split("."):
        if not isinstance(structure, dict) or part not in structure:
            return None
        structure = structure[part]
    if isinstance(structure, str) and structure in ("NaN", "Infinity", "-Infinity"):
        return decode_number(structure)
    return as_float(structure)


def as_float(value: Any) -> Optional[float]:
    """A JSON number (bool included, as 0/1) as a float; None for anything else or too large
    for a float (an integer of 400 digits is no value the log can stand for)."""
    if isinstance(value, _NUMBER):
        try:
            return float(value)
        except OverflowError:
            return None
    return None
