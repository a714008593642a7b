"""The run log: append-only JSON lines, one record per line, crash-safe.

Layout of ``LOGDIR/cockpit.jsonl``::

    {"type": "header", "format": "cockpit-lite-log", "version": 1, ...}
    {"type": "step", "step": 0, "wall": ..., "values": {...}, "reasons": {...}, "data": {...}, "flags": [...]}
    {"type": "step", "step": 0, "amends": true, "values": {"alpha": ...}}   (completes step 0)
    {"type": "skipped", "step": 3, "reason": "...", ...}
    {"type": "event", "level": "warning", "message": "...", ...}
    {"type": "footer", "steps": 100, ...}

Each record is written with one ``write`` of a whole line and flushed, so a process killed with
SIGKILL keeps every line written before the kill (the OS holds it); at most the line being written
is torn. (``Cockpit`` hands step records over in batches of 16, ``batch.py``: a kill loses at most
those.) Non-finite numbers are stored as the strings "NaN", "Infinity", "-Infinity" so that the file
is standard JSON. The reader accepts a torn last line (and says so in ``Run.torn_tail`` and a
warning), refuses any other malformed line with its line number, and reads logs that are still
growing (``Run.refresh``).

Reading is the slow part of plotting a long run (a 100,000-step log is ~150 MB of JSON), so the
reader (1) decodes with the cyclic garbage collector paused (it would otherwise rescan the growing
set of records again and again, doubling the decode time), (2) answers ``series`` from columns
built once per read (numpy arrays per key) instead of scanning every record per call, and
(3) ``load`` keeps a cache next to large logs (``.cockpit.jsonl.cache``, see ``cockpit_lite/runlog/cache.py``):
the state after the log's first N bytes, used only when those N bytes still hash to the
digest stored with them; the lines after N are decoded from the log as usual. The log stays the
only source of truth: a missing, stale, foreign or corrupt cache is ignored (and rewritten).
A run read from a cache answers ``series``, ``steps``, ``reasons``, ``flagged``, ``field``,
``data_field``, ``last_data`` and ``data`` without building its records (``Run.records`` builds them on first use), and
(4) lines are decoded with ``orjson`` when it is installed (about 4x faster), falling back to
``json`` for any line it does not accept, so results and errors stay those of ``json.loads``.

Rooms: ``codec.py`` (the format: records, numbers, line decoding, errors), ``writer.py``
(``RunLogWriter``), ``batch.py`` (``BatchedWriter``: step records 16 per write), ``reader.py`` (``Run``, ``load``), ``columns.py`` (numpy columns per key),
``scan.py`` (a large log's columns without building records), ``cache.py`` (the cache next to a
large log), ``files.py`` (claiming and opening log files), ``keys.py`` (which keys a run may hold).
Imports go one way: reader -> cache, scan, columns -> codec; batch -> writer -> codec, files.
"""

from .codec import (FORMAT, LOG_NAME, VERSION, BadRecordError, CorruptLogError, _clean, _decode_line,  # noqa: F401
                    _text_lines, decode_number, encode_number)
from .columns import _decode_table, _entry_column  # noqa: F401
from .reader import MAX_LINE_BYTES, Run, load  # noqa: F401
from .writer import RunLogWriter  # noqa: F401

__all__ = ["RunLogWriter", "Run", "load", "CorruptLogError", "BadRecordError", "LOG_NAME", "FORMAT", "VERSION",
           "encode_number", "decode_number"]
