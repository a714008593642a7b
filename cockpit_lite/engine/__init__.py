"""The engine: a run's life (``cockpit``), where steps begin and end (``step_detection``, ``zero_grad``),
calling quantities (``calls``), records and sinks (``records``), set-up (``setup``).
See docs/architecture.md for the data path of one step."""

from .cockpit import Cockpit, watch

__all__ = ["Cockpit", "watch"]
