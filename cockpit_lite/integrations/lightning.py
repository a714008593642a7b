"""PyTorch Lightning: ``Trainer(callbacks=[CockpitCallback(...)])`` attaches a cockpit for ``fit``.

    from cockpit_lite.integrations.lightning import CockpitCallback
    trainer = lightning.Trainer(callbacks=[CockpitCallback(quantities="economy")])
    trainer.fit(module, loader)          # run log in <trainer.log_dir>/cockpit/cockpit.jsonl

What is observed, and where it comes from:

* model: the ``LightningModule`` (or ``model=``, the submodule that ``training_step`` calls). Step
  timing, per-sample quantities and curvature need its *forward* to run in ``training_step``
  (``self(x)``); the callback warns once if it did not run during the first step.
* optimizer: ``trainer.optimizers`` (one; the torch optimizer, not the ``LightningOptimizer``).
* loss: ``loss_fn=`` or else ``pl_module.loss_fn`` (an ``nn.Module`` that ``training_step`` calls);
  without one ``loss`` and the per-sample quantities are unavailable (warned, logged with the reason).
* steps: one record per optimizer step, however many batches ``accumulate_grad_batches`` puts into
  it. Lightning runs forward and backward in a closure inside ``optimizer.step(closure)``; the cockpit
  reads the gradients after that closure: accumulated, unscaled (AMP's ``GradScaler``) and after
  Lightning's gradient clipping, i.e. the gradients the optimizer uses.
* written to: the run log and, with ``log_to_logger=True``, every logger of the trainer through
  ``Logger.log_metrics`` (CSV, TensorBoard, MLflow, W&B, ...): ``cockpit/<key>`` at the step Lightning
  logs that optimizer step at; ``logger_keys`` chooses the keys (default ``"totals"``: no
  per-parameter values).

Data parallel (``strategy="ddp"``): every process attaches a cockpit, so the statistics are those of
the global batch (the shards' per-sample sums are reduced across processes, see
``cockpit_lite/distributed/``); the global-zero process writes the log and the logger's scalars.
Importing this module imports Lightning (``pip install "cockpit-lite[lightning]"``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cockpit_lite.integrations.lightning needs PyTorch Lightning: pip install \"cockpit-lite[lightning]\""
    ) from err

from ..engine import watch
from ._common import find_loss_module, unwrap_optimizer
from .logger_sink import LoggerSink


class CockpitCallback(Callback):
    """Attach a cockpit to ``trainer.fit`` (created on fit start, closed on fit end or exception).

    Args:
        loss_fn: the loss ``nn.Module`` that ``training_step`` calls; default ``pl_module.loss_fn``.
        logdir: folder of the run log; default ``<trainer.log_dir>/cockpit`` (the logger's version
            folder, or ``default_root_dir`` without a logger).
        quantities: as in :func:`cockpit_lite.watch` (a preset, a list, or name -> schedule).
        log_to_logger: also send each step's scalars to every logger of the trainer (``log_metrics``).
        logger_keys: which keys the loggers get: ``"totals"`` (default: one value per quantity, no
            per-parameter values), ``"all"``, a list of ``fnmatch`` patterns, or a callable ``key -> bool``.
        model: the module to observe; default the ``LightningModule``.
        **watch_options: passed to :func:`cockpit_lite.watch` (``tensorboard``, ``advisor``, ``sinks``, ...).

    After ``fit`` the run log is at ``callback.logdir``; ``callback.cockpit`` is the (closed) cockpit.
    """

    def __init__(self, loss_fn: Optional[torch.nn.Module] = None, logdir: Optional[str] = None,
                 quantities: Any = "default", log_to_logger: bool = True,
                 model: Optional[torch.nn.Module] = None, logger_keys: Any = "totals", **watch_options: Any):
        super().__init__()
        self.loss_fn = loss_fn
        self._logdir_arg = os.fspath(logdir) if logdir is not None else None
        self.logdir = self._logdir_arg  # where the current (or last) fit's run log is
        self.quantities = quantities
        self.log_to_logger = log_to_logger
        self.logger_keys = logger_keys
        self.model = model
        self.watch_options = watch_options
        self.cockpit = None
        self._forward_calls = 0
        self._forward_handle = None
        self._checked_forward = False

    # -- attach / detach ------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        logdir = self._logdir_arg
        if logdir is None:  # trainer.log_dir broadcasts: every process must ask
            logdir = os.path.join(trainer.log_dir or trainer.default_root_dir, "cockpit")
        self._close()  # a previous fit that ended without on_fit_end
        if len(trainer.optimizers) != 1:
            raise ValueError(f"CockpitCallback observes one optimizer; this trainer has {len(trainer.optimizers)}")
        optimizer = unwrap_optimizer(trainer.optimizers[0])
        model = self.model if self.model is not None else pl_module
        loss_fn = find_loss_module(self.loss_fn, pl_module, "training_step", observed=model)
        options = dict(self.watch_options)  # distributed="auto": reduced over the DDP processes
        sinks = list(options.pop("sinks", ()))
        if self.log_to_logger and trainer.is_global_zero and trainer.loggers:
            sinks.append(LoggerSink(trainer.loggers, keys=self.logger_keys, step_offset=trainer.global_step))
        self.cockpit = watch(model, optimizer, loss_fn=loss_fn, logdir=logdir,
                             quantities=self.quantities, sinks=sinks, **options)
        self.logdir = self.cockpit.logdir  # the folder chosen (if_exists="increment": LOGDIR-2, ...)
        self._forward_calls, self._checked_forward = 0, False
        self._forward_handle = model.register_forward_pre_hook(self._count_forward)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None
        if self.cockpit is not None and not self.cockpit.closed:
            self.cockpit.close()

    # -- the forward check ----------------------------------------------------------------------
    def _count_forward(self, module, args) -> None:
        if torch.is_grad_enabled():
            self._forward_calls += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.cockpit is None or self._checked_forward:
            return
        self._checked_forward = True
        if self._forward_calls == 0:
            watched = self.model if self.model is not None else pl_module
            warnings.warn(
                f"cockpit-lite: training_step did not call the forward of the observed "
                f"{type(watched).__name__}; step time, per-sample quantities and curvature need it. Call "
                "self(x) in training_step, or pass CockpitCallback(model=<the submodule training_step calls>).",
                RuntimeWarning, stacklevel=2)

