"""The one-line wrapper: ``watch(model, optimizer, loss_fn=..., logdir=...)``.

``Cockpit`` owns a run's life: set-up (which parameters, which quantities, the run log and sinks), the
hooks (``step_detection.StepDetection``: where a step begins and ends), each tracked step (a
``StepContext`` handed to the active quantities' ``before_step`` / ``after_step``, then one record
written by ``records.Recorder``), skipped steps, and ``close()``.

A step whose backward passes are followed by ``zero_grad`` (or a new forward with cleared gradients)
without ``optimizer.step()`` is recorded as skipped, e.g. by a GradScaler that found inf/NaN gradients.
On steps where no quantity is active the hooks return at once.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
import weakref
from datetime import datetime
from typing import Any, Iterable, List, Mapping, Optional, Union

import torch

from ..distributed import detect, unwrap
from ..forward_buffers import ForwardBuffers
from ..persample import scratch
from ..quantities._moved import since_grad_reason
from ..quantities.base import Quantity, Watched
from ..runlog import RunLogWriter, load
from ..runlog.batch import LOG_BATCH, BatchedWriter
from ..step_context import MicroBatch, StepContext
from .calls import call_hook
from .loss_elements import step_reduction
from .loop_trackers import reset_loop_trackers, start_loop_trackers
from .other_optimizers import passes_of_another_step, watch_other_optimizers
from .records import NoLog, Recorder, header
from .setup import (QuantitySpec, nonfinite_grad_names, now, observed_parameters, resolve_quantities,
                    sequence_first_module, stepping_optimizer, uncompiled)
from .step_detection import StepDetection
from .zero_grad import patch_zero_grad, unpatch_zero_grad, zero_grad_owners

_WATCHED_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_WATCHED_LOSSES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # loss modules of open cockpits


def watch(model, optimizer, loss_fn=None, logdir=None, quantities: QuantitySpec = "default", **options) -> "Cockpit":
    """Attach a cockpit to an existing training loop; see :class:`Cockpit`."""
    return Cockpit(model, optimizer, loss_fn=loss_fn, logdir=logdir, quantities=quantities, **options)


def _checked_sinks(sinks) -> list:
    """``sinks`` as a list, each with ``write`` and ``close`` (a clear error at watch(), not a later one)."""
    try:
        out = list(sinks or ())
    except TypeError:
        raise TypeError(f"watch(sinks=...) takes an iterable of sinks, got {type(sinks).__name__}") from None
    for sink in out:
        if not (callable(getattr(sink, "write", None)) and callable(getattr(sink, "close", None))):
            raise TypeError(f"watch(sinks=...): a sink needs write(record) and close() methods, got "
                            f"{type(sink).__name__}")
    return out


class Cockpit(StepDetection):
    """Observes ``model`` trained by ``optimizer`` and writes one record per tracked step.

    Args:
        model: the ``nn.Module`` being trained.
        optimizer: its ``torch.optim.Optimizer`` (any: SGD, Adam, a custom one).
        loss_fn: the loss ``nn.Module`` the loop calls (e.g. ``nn.CrossEntropyLoss()``); needed
            for ``loss`` and the per-sample quantities. A plain function cannot be observed.
        logdir: folder for the run log (``cockpit.jsonl``); default ``runs/<timestamp>``.
        quantities: a preset name (``"default"``, ``"economy"``, ``"business"``, ``"full"``), a list of
            quantity names or ``Quantity`` objects, or a mapping name -> schedule
            (``{"grad_norm": "every", "loss": "every:10"}``).
        fsync: write every record at once and ``fsync`` it (survives power loss); otherwise step records
            are written 16 at a time (``cockpit_lite.runlog.batch``: a killed process loses at most those).
        sinks: extra consumers of every record (objects with ``write(record)`` and ``close()``),
            e.g. the TensorBoard writer.
        tensorboard: also write every record into a TensorBoard event file in ``logdir`` (scalars
            as ``cockpit/<key>``, structures for the Cockpit tab; see docs/tensorboard.md).
        dashboard: render the live dashboard while training to this PNG (``True``: ``LOGDIR/cockpit.png``),
            in a separate low-priority process that reads the run log (``cockpit_lite.live``); the
            last render is made at ``close()``.
        advisor: run the advisor's rules while training (see ``cockpit_lite.advisor.live``): each
            diagnosis is warned once and logged. A mapping gives thresholds.
        distributed: data-parallel runs (``torch.distributed``, e.g. DDP): ``"auto"`` (default) reduces
            the statistics over all processes of the default group when it is initialized with more
            than one, so that they describe the global batch; a process group to use that one; None to
            observe this process's shard only. Every process must watch; process 0 writes the log
            (the others write nothing). See ``cockpit_lite.distributed``.
        if_exists: what to do when ``logdir`` already holds a run log (re-running a script):
            ``"error"`` (default) raises ``FileExistsError`` naming these choices; ``"increment"``
            writes into the first free numbered folder ``LOGDIR-2``, ``LOGDIR-3``, ... (``cockpit.logdir``
            says which); ``"overwrite"`` replaces the old log, unless a running process still writes
            it. Two runs started on one logdir at once never share a log: one gets it, the other
            gets the error (or, with ``"increment"``, its own numbered folder).
        overhead_budget: a share of the step time (e.g. 0.5): warn once, and log a warning event, when
            cockpit-lite's own work takes more than that over recent tracked steps (needs ``time``;
            ``cockpit_lite/overhead.py``). The dashboard's "Time per step" panel shows the share.
    """

    def __init__(self, model, optimizer, loss_fn=None, logdir=None, quantities: QuantitySpec = "default",
                 *, fsync: bool = False, sinks: Iterable[Any] = (), tensorboard: bool = False,
                 advisor: Union[bool, Mapping[str, Any]] = False, dashboard: Union[None, bool, str] = None,
                 distributed: Any = "auto", if_exists: str = "error", overhead_budget: Optional[float] = None):
        from ..advisor.thresholds import validate as _validate_thresholds
        from ..overhead import check_budget

        if isinstance(advisor, Mapping):  # the same check as `cockpit-lite diagnose --threshold`, before any log
            _validate_thresholds(advisor)
        overhead_budget = check_budget(overhead_budget)
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"watch() needs an nn.Module as model, got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"watch() needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if model in _WATCHED_MODELS:
            raise RuntimeError(
                f"this {type(model).__name__} is already watched by another cockpit; close() that one first"
            )
        if isinstance(loss_fn, torch.nn.Module) and loss_fn in _WATCHED_LOSSES:
            raise RuntimeError(
                f"this {type(loss_fn).__name__} object is already the loss_fn of another open cockpit; its calls "
                "cannot be told apart, so both logs would mix the two models' losses. Create one loss module "
                f"per watched model (e.g. a second {type(loss_fn).__name__}(...)) and call each in its own loss"
            )
        sinks = _checked_sinks(sinks)  # before the run log exists: a bad argument leaves nothing behind
        if dashboard not in (None, True, False) and not isinstance(dashboard, (str, os.PathLike)):
            raise TypeError(f"watch(dashboard=...) takes True, False, None or a PNG path, got {type(dashboard).__name__}")
        model = unwrap(model)  # DDP: hooks and parameter names on the user's module
        group = detect(distributed)
        # torch.compile: the hooks stay on the compiled wrapper (they run outside its graph); names and
        # the curvature's re-evaluation use the original module (compiled graphs have no double backward)
        inner = uncompiled(model)
        self.compiled = inner is not model
        names, params = observed_parameters(inner, optimizer)
        self._model_loss = None  # a Hugging Face model computes its loss in forward: observed there
        if loss_fn is None:
            from ..integrations.hf_loss import observe_model_loss

            self._model_loss = observe_model_loss(inner)
            loss_fn = self._model_loss.module if self._model_loss is not None else None
        if loss_fn is not None and not isinstance(loss_fn, torch.nn.Module):
            warnings.warn(
                "loss_fn is a plain function, which cockpit-lite cannot observe; pass the loss as an "
                "nn.Module (e.g. nn.CrossEntropyLoss()) and call that object in the loop. "
                "'loss' and per-sample quantities will be reported as unavailable.",
                stacklevel=4,
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.reduction = getattr(loss_fn, "reduction", "unknown") if isinstance(loss_fn, torch.nn.Module) else "unknown"
        self.quantities: List[Quantity] = resolve_quantities(quantities)
        self.watched = Watched(inner, optimizer, names, params, loss_fn, group)
        self.watched.seq_first = sequence_first_module(inner)
        self.logdir = os.fspath(logdir) if logdir is not None else os.path.join(
            "runs", datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
        self.writes = group is None or group.rank == 0  # one log per run: process 0 writes it
        run_header = header(model, optimizer, loss_fn, self.reduction, self.watched, self.quantities)
        if self.writes:
            writer = RunLogWriter(self.logdir, run_header, fsync=fsync, if_exists=if_exists)
            self.logdir = os.fspath(writer.logdir)  # LOGDIR-2, ... with if_exists="increment"
            # step records in batches of LOG_BATCH (runlog/batch.py); fsync=True: every record at once
            writer = BatchedWriter(writer, batch=1 if fsync else LOG_BATCH)
        else:
            writer = NoLog(self.logdir)
            tensorboard = advisor = dashboard = False
        self._records = Recorder(writer, sinks if self.writes else ())
        self._records.open_sinks(run_header)
        if tensorboard:
            from ..tensorboard.writer import TensorBoardSink

            self._records.sinks.append(TensorBoardSink(self.logdir))
        if advisor:
            from ..advisor.live import AdvisorSink

            self._records.sinks.append(AdvisorSink(self.logdir, self._event, thresholds=dict(advisor)
                                                   if isinstance(advisor, Mapping) else None))
        if overhead_budget is not None:
            from ..overhead import OverheadSink

            self._records.sinks.append(OverheadSink(overhead_budget, self._event,
                                                    quantities if isinstance(quantities, str) else None))
        self._live = None
        if dashboard:
            from ..live import LiveDashboard

            png = os.path.join(self.logdir, "cockpit.png") if dashboard is True else os.fspath(dashboard)
            self._live = LiveDashboard(self.logdir, png).start()
        self._layer_capture = None  # created on first need (cockpit_lite.persample.capture)
        self._model_calls: List[Any] = []
        self.step = 0
        self.closed = False
        self._open_forwards: List[dict] = []  # forwards of the model begun and not yet returned (kept across steps)
        self._forward_buffers = ForwardBuffers()  # buffers as each forward found them (for re-evaluations)
        self._rule_check_failures = 0  # steps on which the per-sample self-check failed (retried up to 3)
        start_loop_trackers(self, params)  # extra backward passes, repeated samples, other optimizers (loop_trackers.py)
        self._quiet = 0  # > 0 while the hooks ignore what runs (later closure evaluations of one step)
        self._reset_step_state()
        for q in self.quantities:
            q.start(self.watched)
        self._before_buffers: Optional[List[torch.Tensor]] = None
        stepper = stepping_optimizer(optimizer)  # a SAM wrapper's base optimizer takes the step
        self._handles = [
            model.register_forward_pre_hook(self._on_model_forward_pre, with_kwargs=True),
            model.register_forward_hook(self._on_model_forward, always_call=True),  # also when it raises
            stepper.register_step_pre_hook(self._on_step_pre),
            stepper.register_step_post_hook(self._on_step_post),
        ]
        if isinstance(loss_fn, torch.nn.Module):
            self._handles.append(loss_fn.register_forward_hook(self._on_loss, with_kwargs=True))
            _WATCHED_LOSSES.add(loss_fn)
        self._zero_grad_patches = patch_zero_grad(self, zero_grad_owners(optimizer, model, inner) +
                                                  ([stepper] if stepper is not optimizer else []))
        self._handles.append(watch_other_optimizers(self))  # a GAN's other step is not a skipped one
        if self._model_loss is not None:
            self._model_loss.install(self.watched)
        _WATCHED_MODELS.add(model)

    # -- public ---------------------------------------------------------------------------------
    @property
    def log_path(self) -> str:
        return str(self._writer.path)

    @property
    def _writer(self):
        return self._records.writer

    def load(self):
        """The run log as written so far (see :func:`cockpit_lite.load`), the waiting records included."""
        self.flush()
        return load(self.logdir)

    def flush(self) -> None:
        """Write the step records still waiting for their batch (``cockpit_lite.runlog.batch``) now, and have the
        sinks write theirs (TensorBoard's event file is written by a thread of its own)."""
        flush = getattr(self._writer, "flush", None)
        if flush is not None and not self._writer.closed:
            flush()
            self._records.flush_sinks()

    def close(self) -> None:
        """Remove every hook, flush and close the run log. A second call does nothing (``with watch(...)``
        after an explicit ``close()``, a cleanup handler and a ``finally`` both closing are fine)."""
        if self.closed:
            return
        self.closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        unpatch_zero_grad(self._zero_grad_patches)
        self._zero_grad_patches = []
        if self._model_loss is not None:
            self._model_loss.remove()
        if self._layer_capture is not None:
            self._layer_capture.remove()
        if self._pending_backward():
            self._record_skipped("the run ended after backward() without optimizer.step()")
        self._finish_quantities()
        for q in self.quantities:
            try:
                q.close()
            except Exception as err:  # closing must not fail because one quantity does
                self._event("warning", f"quantity {q.name!r} failed to close: {err!r}")
        self._records.close({"steps": self.step, "closed": now()})
        _WATCHED_MODELS.discard(self.model)
        if isinstance(self.loss_fn, torch.nn.Module):
            _WATCHED_LOSSES.discard(self.loss_fn)
        self._before_buffers = None
        if self.watched.dist is not None:
            self.watched.dist.release()  # no process group of ours outlives the run (issue 24 item 10)
        if self._live is not None:
            self._live.stop()  # renders the finished log once more

    def __enter__(self) -> "Cockpit":
        return self

    def __exit__(self, *exc) -> None:
        if not self.closed:
            self.close()

    def __del__(self):  # best effort: a forgotten close() still leaves a readable log
        try:
            if not self.closed and not self._writer.closed:
                self._writer.close()
        except Exception:
            pass

    # -- step state -----------------------------------------------------------------------------
    def _reset_step_state(self) -> None:
        self._active: Optional[List[Quantity]] = None
        self._needs: frozenset = frozenset()
        self._micro_batches: List[MicroBatch] = []
        reset_loop_trackers(self)
        self._backward_passes = 0
        self._t_start: Optional[float] = None
        self._overhead = 0.0
        self._ctx: Optional[StepContext] = None
        self._model_calls = []
        self._backward_end_queued = False
        self._last_output = None  # the model's last training output until the loss call (persample/output_view.py)
        if getattr(self, "_layer_capture", None) is not None:
            self._layer_capture.disarm()  # drop what an unfinished/skipped step captured
        scratch.release()  # (and after the step's after_step projections, which may take them again)

    def _activate(self) -> List[Quantity]:
        """Quantities active on the current step (decided once per step)."""
        if self._active is None:
            self._active = [q for q in self.quantities if self._scheduled(q)]
            needs = set()
            for q in self._active:
                needs |= q.needs
            if "layer_io" in needs:  # the self-check and the per-sample replay (persample/replayed.py) re-run it
                needs.add("model_inputs")
            if needs & {"layer_io", "model_inputs"}:
                needs.add("loss_inputs")
            self._needs = frozenset(needs)
        return self._active

    def _scheduled(self, q: Quantity) -> bool:
        """``q.is_active(step)``; a schedule that raises (a user's callable, one returning a tensor of several
        values) skips the quantity on this step with a warning, never an error in the user's forward."""
        try:
            return bool(q.is_active(self.step))
        except Exception as err:
            self._warn_once(f"schedule:{q.name}", (
                f"cockpit-lite: the schedule of {q.name!r} raised {type(err).__name__}: {err}; the quantity is "
                f"skipped on step {self.step} and on every step where it raises"))
            return False

    # -- a tracked step -------------------------------------------------------------------------
    def _before_step(self) -> None:
        t0 = time.perf_counter()
        self._repeats.resolve()  # the step's gradients are final: which loss calls read samples twice
        active = self._activate()
        if not active:
            return None
        reduction = step_reduction(self.reduction, self._micro_batches)  # loss_fn's elements, combined as the loop did
        ctx = StepContext(self.step, self.watched, self._micro_batches, reduction)
        ctx.t_start = self._t_start
        ctx.model_calls = self._model_calls
        ctx.active = list(active)  # lets shared work be planned (e.g. ctx.per_sample fuses per-layer passes)
        if self._layer_capture is not None and "layer_io" in self._needs:
            ctx.layer_io = self._layer_capture.disarm()
            ctx.layer_io.reached = self._reaches_params.take()  # backward(inputs=...) leaves parameters out
        self._ctx = ctx
        if "update" in self._needs:
            with torch.no_grad():
                if self._before_buffers is None:
                    self._before_buffers = [torch.empty_like(p) for p in self.watched.params]
                torch._foreach_copy_(self._before_buffers, self.watched.params)
            ctx.params_before = self._before_buffers
        if ctx.layer_io is not None and (self.watched.rule_check is None or self._rules_unchecked(ctx)):
            self._check_rules(ctx)
        active = self._at_grad_point(ctx, active)
        call_hook(active, "before_step", ctx, self.watched.dist, self._failed)
        scratch.release()  # the pass's reused buffers (persample/scratch.py): not held through the optimizer step
        ctx.flush_norms()  # every norm asked for, in one reduction, before the optimizer changes the parameters
        self._overhead += time.perf_counter() - t0
        return None

    def _at_grad_point(self, ctx: StepContext, active: List[Quantity]) -> List[Quantity]:
        """Where the loop changed parameters in place since the step's backward pass (param_versions.py),
        the quantities reading them as theta_t are NaN with the reason: those reading norms keep the parts
        of the unchanged parameters, those needing their values (curvature, grad_hist_2d) are not computed.
        Returns the quantities to call."""
        moved = self._param_versions.moved()
        if not moved:
            return active
        ctx.moved_since_grad = names = [self.watched.names[i] for i in moved]
        reason = since_grad_reason(names)
        keep = set(self.watched.names) - set(names)
        for q in active:
            if q.reads_theta == "norms":
                ctx.after_values(q.name, functools.partial(StepContext.withdraw, name=q.name, reason=reason, keep=keep))
            elif q.reads_theta == "all":
                ctx.emit_nan(q.name, reason)
        return [q for q in active if q.reads_theta != "all"]

    def _on_step_post(self, optimizer, args, kwargs):
        t0 = time.perf_counter()
        ctx = self._ctx
        if ctx is not None:
            ctx.t_hook = t0
            ctx.t_overhead = self._overhead
            call_hook(self._active, "after_step", ctx, self.watched.dist, self._failed)
            self._records.write_step(ctx, self._backward_passes, self.watched.dist)
        self.step += 1
        self._reset_step_state()
        return None

    def _check_rules(self, ctx: StepContext) -> None:
        from .selfcheck import check_step

        check_step(self, ctx)

    def _rules_unchecked(self, ctx: StepContext) -> bool:
        from .selfcheck import unchecked

        try:
            return unchecked(ctx)
        except Exception:  # the quantities meet the same failure and report it with their values
            return False

    def _failed(self, q: Quantity, method: str, ctx: StepContext, failed: BaseException) -> None:
        reason = f"{type(failed).__name__} in {q.name}.{method}: {failed}"
        ctx.discard(q.name)  # what it emitted before failing may be half-done (or paired wrongly)
        ctx.emit_nan(q.name, reason)
        for key in sorted(self._records.parts.get(q.name, ())):  # its parts logged on earlier steps, labelled too
            ctx.emit_nan(key, reason)
        self._warn_once(f"fail:{q.name}", f"cockpit-lite: quantity {q.name!r} failed ({reason}); "
                                          "it is logged as NaN with this reason")

    def _finish_quantities(self) -> None:
        """At close, every quantity's ``finish(ctx)`` records what only the end of the run resolves
        (values of earlier steps, via ``ctx.emit_for_step``); written as amendments."""
        ctx = StepContext(self.step, self.watched, [], self.reduction)
        for q in self.quantities:
            if getattr(type(q), "finish", Quantity.finish) is Quantity.finish:
                continue  # nothing to resolve: no call
            try:
                q.finish(ctx)
            except Exception as err:  # closing must not fail because one quantity does
                self._event("warning", f"quantity {q.name!r} failed to finish: {err!r}")
        self._records.write_amendments(ctx, time.time())

    # -- skipped steps, events ------------------------------------------------------------------
    def _record_skipped(self, reason: str) -> None:
        if passes_of_another_step(self):  # a GAN's other network stepped: its passes, not a skip (other_optimizers.py)
            self._reset_step_state()
            return
        nonfinite = nonfinite_grad_names(self.watched)
        if not nonfinite and not self.closed and self._param_versions.moved():
            # the loop moved the parameters after these passes and dropped their gradients: an ascent pass of
            # sharpness-aware minimization (param_versions.py), not a skipped step; the step is the next passes
            self._warn_once("probe_pass", (
                "cockpit-lite: backward() was followed by an in-place change of the parameters and cleared "
                "gradients without optimizer.step() (e.g. sharpness-aware minimization's ascent pass): not a "
                "skipped step; the step's values describe the gradient of the passes after it"))
            t_start, overhead = self._t_start, self._overhead  # the step's time includes its ascent pass
            self._reset_step_state()
            self._param_versions.probed()
            self._t_start, self._overhead = t_start, overhead
            if t_start is not None:
                self._activate()
                if "layer_io" in self._needs:
                    self._arm_layer_capture()
            return
        if nonfinite:
            reason = (f"{reason}; gradients were not finite in {', '.join(nonfinite[:5])}"
                      f"{' ...' if len(nonfinite) > 5 else ''} (a GradScaler skips such steps)")
        losses = [float(m.loss) for m in self._micro_batches]
        record = {"type": "skipped", "step": self.step, "wall": time.time(), "reason": reason,
                  "backward_passes": self._backward_passes}
        if losses:
            record["loss"] = sum(losses) / len(losses)
        self._records.emit(record)
        for q in self._active or ():
            q.on_skipped(self.step, reason)
        self.step += 1
        self._reset_step_state()

    def _event(self, level: str, message: str, **fields: Any) -> None:
        self._records.event(self.step, level, message, **fields)

    def _warn_once(self, key: str, message: str) -> None:
        self._records.warn_once(key, message, self.step, stacklevel=5)
