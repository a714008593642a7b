"""``LoggerSink``: a cockpit sink that sends each step's scalar values to Lightning's loggers through
``Logger.log_metrics(metrics, step)``, so every attached logger receives them: ``CSVLogger``,
``TensorBoardLogger``, ``MLFlowLogger``, ``WandbLogger``, ... (anything with ``log_metrics``).

Keys are ``cockpit/<key>``, chosen by ``keys`` (default ``"totals"``: no per-parameter values; see
:mod:`cockpit_lite.sinks.keys`). The step is the cockpit's step plus ``step_offset`` (the trainer's
global step when the cockpit was attached), which is the step Lightning logs ``self.log`` values of the
same optimizer step at, also after a resume. NaN values are sent as NaN (the reason is in the run
log); amendments (``alpha`` of step t, known at t+1) are sent at their own step; a value older than
its key's last step is left out (it stays in the run log). Structured data stays in the run log.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

from ..sinks.keys import KeySpec, path_safe
from ..sinks.metrics import MetricsSink


class LoggerSink(MetricsSink):
    """Args: ``loggers`` (objects with ``log_metrics(metrics, step)``), ``keys``, ``step_offset``, ``prefix``."""

    def __init__(self, loggers: Iterable[Any], keys: KeySpec = "totals", step_offset: int = 0,
                 prefix: str = "cockpit/"):
        super().__init__(keys=keys, prefix=prefix, step_offset=step_offset)
        self.loggers: List[Any] = list(loggers)

    def emit(self, metrics: Dict[str, float], step: int) -> None:
        for logger in self.loggers:
            # MLflow's file store cannot hold cockpit/alpha beside cockpit/alpha/stderr (sinks/keys.path_safe)
            named = path_safe(metrics, self.prefix) if "mlflow" in type(logger).__name__.lower() else dict(metrics)
            logger.log_metrics(named, step)

    def flush(self) -> None:
        """Let buffering loggers (CSVLogger) write what they hold; the loggers belong to the trainer."""
        for logger in self.loggers:
            save = getattr(logger, "save", None)
            if save is not None:
                save()
