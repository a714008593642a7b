"""``MLflowSink``: each step's values into an MLflow run (``pip install mlflow``).

    cockpit_lite.watch(model, optimizer, loss_fn=crit, sinks=[MLflowSink()])        # the active run
    MLflowSink(run_id="...", tracking_uri="file:./mlruns")                            # a given run

``tracking_uri`` is set globally (``mlflow.set_tracking_uri``). Without ``run_id`` the values go to the active run (``mlflow.start_run()`` before ``watch``), or to a run
this sink starts (and ends at ``close``). Values are sent with ``log_metrics(..., step=)`` once per step.
Sub-keys are named with "." (``cockpit/alpha.stderr``, ``cockpit/grad_norm.fc.weight``): MLflow's file store
keeps ``a/b`` as a file in a folder ``a``, which cannot exist beside the metric ``a`` (``keys.path_safe``).
"""

from __future__ import annotations

from typing import Dict, Optional

from .keys import KeySpec, path_safe
from .metrics import MetricsSink, require


class MLflowSink(MetricsSink):
    def __init__(self, run_id: Optional[str] = None, tracking_uri: Optional[str] = None, keys: KeySpec = "totals",
                 prefix: str = "cockpit/", step_offset: int = 0):
        super().__init__(keys=keys, prefix=prefix, step_offset=step_offset)
        self._mlflow = require("mlflow", "MLflowSink")
        self._started = False
        if tracking_uri is not None:
            self._mlflow.set_tracking_uri(tracking_uri)
        if run_id is not None:
            self.run_id = run_id
        else:
            run = self._mlflow.active_run()
            if run is None:
                run = self._mlflow.start_run()
                self._started = True
            self.run_id = run.info.run_id

    def emit(self, metrics: Dict[str, float], step: int) -> None:
        self._mlflow.log_metrics(path_safe(metrics, self.prefix), step=step, run_id=self.run_id)  # mlflow >= 2.14

    def close(self) -> None:
        super().close()
        if self._started:
            self._mlflow.end_run()
