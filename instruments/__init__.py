"""Pluggable instruments: panels that read quantities from a run log and draw themselves.

An instrument is a small object with

* ``name``: a short identifier (``"grad_norm"``, ``"alpha_gauge"``), used by ``--instruments``;
* ``title``: the panel title;
* ``group``: what it diagnoses, one of :data:`GROUPS` (``"step size"``, ``"gradients"``,
  ``"curvature"``, ``"performance"``, ``"cost"``); the dashboard arranges panels by group;
* ``keys``: the log keys it reads (``"grad_norm"``, ``"alpha"``; see docs/record-keys.md);
* ``kind``: how it looks (``"lines"``, ``"histogram"``, ``"histogram2d"``, ``"parabola"``,
  ``"scatter"``), for views that do not use matplotlib (the TensorBoard tab);
* ``missing(run) -> str | None``: ``None`` when the run has something to draw, otherwise the reason
  (which quantity is absent and how to enable it, or the reasons logged with its NaN values);
* ``draw(ax, run)``: draw on a matplotlib ``Axes``;
* ``tab``: the TensorBoard tab's panel that shows it (default: its own panel, named like it);
  instruments with the same ``tab`` share one panel there (:func:`tab_panels`);
* ``describe() -> dict``: the JSON description (name, title, group, keys, kind, tab).

``run`` is a :class:`RunView`: the ``Run`` of :func:`cockpit_lite.load` restricted to a step
range, with the same read methods (``series``, ``data``, ``reasons``, ``keys``, ``header``).

Third-party instruments register through the entry-point group ``cockpit_lite.instruments``;
the object may be an ``Instrument`` subclass, an instance, or a function returning instances::

    [project.entry-points."cockpit_lite.instruments"]
    my_panel = "my_package.my_panel:MyPanel"

:func:`discover` returns the built-in instruments followed by the registered ones, and the
dashboard shows them without any change to this package (see examples/third_party_instrument).

Importing this package does not import matplotlib; drawing does.
"""

from __future__ import annotations

if __name__ == "instruments":  # the old import name (deprecated): this becomes cockpit_lite.instruments
    from cockpit_lite.instruments._old_name import redirect as _redirect

    _redirect()  # what follows then imports the same objects (instruments.X is cockpit_lite.instruments.X)

from typing import Optional

from ._base import GROUPS, KINDS, Instrument
from ._reasons import enable_hint, missing_reason, no_records, quantity_of
from ._registry import (GROUP_ENTRY_POINTS, ORDER, PANEL_LESS, builtin, builtin_modules, discover, select,
                        tab_panels, third_party)
from ._run_view import RunView, as_view


#: drawing helpers that the rest of cockpit_lite (notebook plots, the dashboard) uses too: public names,
#: imported on first use (they import matplotlib)
_DRAWING = {"PALETTE": "_draw", "draw_line": "_draw", "finish": "_draw", "scale_y": "_draw", "tidy": "_tidy",
            "error_band": "_error_band", "draw_note": "_nan_note", "nan_lines": "_nan_note", "nan_note": "_nan_note"}


def __getattr__(name: str):
    if name in _DRAWING:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_DRAWING[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def downsample(steps, values, max_points: Optional[int] = None):
    """Reduce a long series for display (min/max per bucket, spikes kept); see ``_draw.downsample``."""
    from ._draw import MAX_POINTS, downsample as _downsample

    return _downsample(steps, values, max_points or MAX_POINTS)


__all__ = ["Instrument", "RunView", "downsample", "GROUPS", "KINDS", "PANEL_LESS", "GROUP_ENTRY_POINTS", "builtin", "third_party",
           "discover", "select", "tab_panels", "builtin_modules", "ORDER", "as_view", "missing_reason", "enable_hint", "quantity_of",
           "no_records", *_DRAWING]
