"""Hugging Face ``transformers.Trainer``: ``Trainer(..., callbacks=[CockpitTrainerCallback(...)])``.

    from cockpit_lite.integrations.transformers import CockpitTrainerCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[CockpitTrainerCallback(quantities="economy")])
    trainer.train()                      # run log in <args.output_dir>/cockpit/cockpit.jsonl

What is observed, and where it comes from:

* model and optimizer: from ``on_train_begin`` (the Trainer's model; accelerate's
  ``AcceleratedOptimizer`` is unwrapped to the torch optimizer it holds).
* loss: Hugging Face models compute the loss inside ``forward``; the cockpit observes it when that
  happens through an ``nn.Module``: ``loss_fn=`` or else ``model.loss_fn``. Without one ``loss`` and
  the per-sample quantities are unavailable (warned, logged with the reason).
* steps: one record per optimizer step, however many micro-batches ``gradient_accumulation_steps``
  puts into it. The Trainer clips the gradients (``max_grad_norm``, 1.0 by default) *before*
  ``optimizer.step()``: ``grad_norm`` and the gradient statistics are those of the clipped gradients,
  the ones the optimizer uses (the Trainer's own ``grad_norm`` log is the norm before clipping).
* loss of a stock model (``GPT2LMHeadModel``, ``BertForSequenceClassification``, ...): observed where
  its ``forward`` computes it (``self.loss_function`` or a loss module made there), with no change to
  the model; see ``cockpit_lite/integrations/hf_loss.py``.
* steps: the record of an optimizer step has the Trainer's ``global_step`` after that step (1, 2, ...).
* written to: the run log; with ``report=True`` (default) also the Trainer's ``report_to`` integrations
  (TensorBoard, W&B, MLflow, ...) as ``cockpit/<key>`` at ``global_step``; ``report_keys`` chooses the
  keys (default ``"totals"``). ``tensorboard=True`` (passed on to ``watch``) also writes TensorBoard
  data into the cockpit's logdir.

Data parallel (``torchrun``/``accelerate launch``): every process attaches a cockpit, so the
statistics are those of the global batch (the shards' per-sample sums are reduced across processes,
see ``cockpit_lite/distributed/``); process 0 writes the log. The Trainer has no exception callback: if ``train()`` raises, call
``callback.close()`` (the next ``on_train_begin`` also closes a cockpit left open). Importing this module imports ``transformers``
(``pip install "cockpit-lite[transformers]"``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

import torch

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "cockpit_lite.integrations.transformers needs transformers: pip install \"cockpit-lite[transformers]\""
    ) from err

from ..engine import watch
from ._common import find_loss_module, unwrap_optimizer
from .hf_report import TrainerReportSink, calling_handler, reporting_callbacks


class CockpitTrainerCallback(TrainerCallback):
    """Attach a cockpit to ``Trainer.train`` (created on train begin, closed on train end).

    Args:
        loss_fn: the loss ``nn.Module`` the model's ``forward`` calls; default ``model.loss_fn``.
        logdir: folder of the run log; default ``<args.output_dir>/cockpit``.
        quantities: as in :func:`cockpit_lite.watch` (a preset, a list, or name -> schedule).
        report: also send each step's values to the Trainer's ``report_to`` integrations.
        report_keys: which keys they get: ``"totals"`` (default: no per-parameter values), ``"all"``,
            a list of ``fnmatch`` patterns or a callable ``key -> bool``.
        report_callbacks: the callbacks to send them to (default: the Trainer's integrations).
        **watch_options: passed to :func:`cockpit_lite.watch` (``tensorboard``, ``advisor``, ``sinks``, ...).

    After ``train()`` the run log is at ``callback.logdir``; ``callback.cockpit`` is the (closed) cockpit.
    """

    def __init__(self, loss_fn: Optional[torch.nn.Module] = None, logdir: Optional[str] = None,
                 quantities: Any = "default", report: bool = True, report_keys: Any = "totals",
                 report_callbacks: Optional[list] = None, **watch_options: Any):
        self.loss_fn = loss_fn
        self.report = report
        self.report_keys = report_keys
        self.report_callbacks = report_callbacks
        self._report: Optional[TrainerReportSink] = None
        self._logdir_arg = os.fspath(logdir) if logdir is not None else None
        self.logdir = self._logdir_arg  # where the current (or last) run log is
        self.quantities = quantities
        self.watch_options = watch_options
        self.cockpit = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.close()  # a previous train() that raised
        if model is None or optimizer is None:
            raise RuntimeError("CockpitTrainerCallback: the Trainer passed no model or optimizer to on_train_begin")
        optimizer = unwrap_optimizer(optimizer)
        loss_fn = find_loss_module(self.loss_fn, model, "the model's forward")
        logdir = self._logdir_arg if self._logdir_arg is not None else os.path.join(args.output_dir, "cockpit")
        options = dict(self.watch_options)
        sinks = list(options.pop("sinks", ()))
        self._report = None
        if self.report and state.is_world_process_zero:
            callbacks = self.report_callbacks
            if callbacks is None:
                handler = calling_handler(self)
                callbacks = reporting_callbacks(handler) if handler is not None else []
            if callbacks:
                self._report = TrainerReportSink(callbacks, keys=self.report_keys)
                sinks.append(self._report)
            elif args.report_to and args.report_to not in ("none", ["none"]) and self.report_callbacks is None:
                warnings.warn("cockpit-lite: the Trainer's report_to integrations were not found; the values are "
                              "in the run log only (pass CockpitTrainerCallback(report_callbacks=[...]))",
                              RuntimeWarning, stacklevel=2)
        # distributed="auto" (the default): reduced over the processes of a data-parallel run
        self.cockpit = watch(model, optimizer, loss_fn=loss_fn, logdir=logdir, quantities=self.quantities,
                             sinks=sinks, **options)
        self.logdir = self.cockpit.logdir  # the folder chosen (if_exists="increment": LOGDIR-2, ...)
        self.cockpit.step = state.global_step + 1  # records carry the Trainer's global_step after the step

    def on_step_end(self, args, state, control, **kwargs):
        if self._report is not None and not self._report.closed:
            try:
                self._report.forward(args, state, control, model=kwargs.get("model"))
            except Exception as err:  # a failing tracker never stops training
                self._report.closed = True
                warnings.warn(f"cockpit-lite: forwarding to the Trainer's integrations failed ({err!r}); stopped "
                              "(the run log is unaffected)", RuntimeWarning, stacklevel=2)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Detach the cockpit and finish its run log (no-op when none is open)."""
        if self.cockpit is not None and not self.cockpit.closed:
            self.cockpit.close()
