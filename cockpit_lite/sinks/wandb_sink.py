"""``WandbSink``: each step's values into a Weights & Biases run (``pip install wandb``).

    wandb.init(project="my-project")
    cockpit_lite.watch(model, optimizer, loss_fn=crit, sinks=[WandbSink()])

The values go to ``run`` or else the active run (``wandb.run``); without one the sink calls
``wandb.init(**init_kwargs)`` and finishes that run at ``close``. Each step is one ``run.log(metrics)``
call carrying ``cockpit/step`` (declared with ``define_metric`` as the x-axis of the ``cockpit/*``
series), so W&B's own step counter, which your other ``wandb.log`` calls advance, is left alone and an
amendment for an earlier step (``alpha``) is still accepted.
"""

from __future__ import annotations

from typing import Any, Dict

from .keys import KeySpec
from .metrics import MetricsSink, require


class WandbSink(MetricsSink):
    def __init__(self, run: Any = None, keys: KeySpec = "totals", prefix: str = "cockpit/", step_offset: int = 0,
                 **init_kwargs: Any):
        super().__init__(keys=keys, prefix=prefix, step_offset=step_offset)
        wandb = require("wandb", "WandbSink")
        self._started = False
        if run is None:
            run = wandb.run
        if run is None:
            run = wandb.init(**init_kwargs)
            self._started = True
        self.run = run
        self.step_key = prefix + "step"
        try:
            run.define_metric(self.step_key)
            run.define_metric(prefix + "*", step_metric=self.step_key)
        except Exception:  # older clients: the step key is still logged with every row
            pass

    def emit(self, metrics: Dict[str, float], step: int) -> None:
        self.run.log(dict(metrics, **{self.step_key: step}))

    def close(self) -> None:
        super().close()
        if self._started:
            self.run.finish()
