"""Forward each step's values to the Hugging Face Trainer's ``report_to`` integrations.

The Trainer's integrations (``TensorBoardCallback``, ``WandbCallback``, ``MLflowCallback``, ... the
classes of ``transformers.integrations.INTEGRATION_TO_CALLBACK``) log what they receive in ``on_log``
at ``state.global_step``. :class:`TrainerReportSink` keeps the records the cockpit writes during
``optimizer.step()`` and, at the Trainer's ``on_step_end`` (when ``global_step`` counts that step),
calls each integration's ``on_log`` with ``{"cockpit/<key>": value}`` and a copy of the state whose
``global_step`` is the record's step (an amendment, ``alpha`` of step t, goes at step t). Only the
integrations are called: the progress bar and printer callbacks do not print these values.

The callbacks are found through the ``CallbackHandler`` that calls ``on_train_begin`` (the caller's
frame); ``CockpitTrainerCallback(report_callbacks=[...])`` names them explicitly instead.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List, Optional, Tuple

from ..sinks.keys import KeySpec
from ..sinks.metrics import MetricsSink


class TrainerReportSink(MetricsSink):
    def __init__(self, callbacks: List[Any], keys: KeySpec = "totals", prefix: str = "cockpit/"):
        super().__init__(keys=keys, prefix=prefix)
        self.callbacks = list(callbacks)
        self.pending: List[Tuple[int, Dict[str, float]]] = []

    def emit(self, metrics: Dict[str, float], step: int) -> None:
        self.pending.append((step, metrics))

    def forward(self, args, state, control, **kwargs: Any) -> None:
        """Send the pending values to the integrations (at ``on_step_end``)."""
        pending, self.pending = self.pending, []
        for step, metrics in pending:
            at = copy.copy(state)
            at.global_step = step
            for callback in self.callbacks:
                callback.on_log(args, at, control, logs=dict(metrics), **kwargs)


def integration_classes() -> tuple:
    try:
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK
    except ImportError:  # pragma: no cover - older transformers
        from transformers.integrations import INTEGRATION_TO_CALLBACK
    return tuple(set(INTEGRATION_TO_CALLBACK.values()))


def calling_handler(callback: Any, depth: int = 6) -> Optional[Any]:
    """The ``CallbackHandler`` (an object whose ``callbacks`` list holds ``callback``) up the call stack."""
    frame = inspect.currentframe()
    try:
        for _ in range(depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(getattr(owner, "callbacks", None), list) and any(c is callback for c in owner.callbacks):
                return owner
        return None
    finally:
        del frame


def reporting_callbacks(handler: Any) -> List[Any]:
    """The ``report_to`` integrations among the handler's callbacks."""
    classes = integration_classes()
    return [c for c in handler.callbacks if isinstance(c, classes)]
