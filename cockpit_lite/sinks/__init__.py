"""Sinks that send each step's scalar values to experiment trackers, for plain training loops.

    import cockpit_lite
    from cockpit_lite.sinks import MLflowSink, WandbSink
    cockpit = cockpit_lite.watch(model, optimizer, loss_fn=crit, sinks=[WandbSink()])  # the active wandb run

A sink receives every record the cockpit writes (``write(record)``, ``close()``); these turn a step
record into ``{"cockpit/<key>": value}`` at the record's step, with the keys chosen by ``keys``
(``"totals"`` by default: one value per quantity, no per-parameter values; see
:func:`cockpit_lite.sinks.keys.key_filter`). ``mlflow`` and ``wandb`` are imported only when such a
sink is created; ``import cockpit_lite.sinks`` imports neither.
"""

from __future__ import annotations

__all__ = ["MetricsSink", "MLflowSink", "WandbSink", "key_filter"]

_LAZY = {"MetricsSink": "metrics", "MLflowSink": "mlflow_sink", "WandbSink": "wandb_sink", "key_filter": "keys"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
