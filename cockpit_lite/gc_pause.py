"""Pausing Python's cyclic garbage collector while many acyclic objects are built.

A run log's records are plain data without reference cycles. Building a million of them with the
collector on makes it rescan every earlier record every few thousand new objects (about half of a
large log's decode time); nothing is lost by pausing it, since reference counting frees them."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def gc_paused():
    """Disable the cyclic collector for the ``with`` block; restore the caller's setting after."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()
