"""The one-line wrapper: ``watch(model, optimizer, loss_fn=..., logdir=...)``.

How a step is observed (no change to the user's loop):

* a forward pre-hook on the model marks the start of a step (the first training forward after the
  previous step) and a tensor hook on the model output counts backward passes;
* a forward hook on ``loss_fn`` (an ``nn.Module``) keeps each micro-batch's loss, and a tensor hook
  on the loss output reads the factor the backward pass was started with (1/accumulation, AMP scale);
* the optimizer's step pre-hook runs when ``.grad`` is final (after accumulation, after unscaling):
  quantities' ``before_step``; the step post-hook: ``after_step``, then one log record is written;
* a step whose backward passes are followed by ``zero_grad`` (or a new forward with cleared
  gradients) without ``optimizer.step()`` is recorded as skipped, e.g. by a GradScaler that found
  inf/NaN gradients.

On steps where no quantity is active the hooks return at once.
"""

from __future__ import annotations

import inspect
import math
import os
import platform
import time
import warnings
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch.utils._pytree import tree_leaves

from . import __version__, presets, quantities as qreg
from .quantities.base import Quantity, Watched
from .distributed import OutOfStep, detect, unwrap
from .replay import is_replaying
from .rng import rng_state
from .runlog import RunLogWriter, load
from .step_context import MicroBatch, StepContext

_WATCHED_MODELS: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()
_WATCHED_LOSSES: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()  # loss modules of open cockpits

QuantitySpec = Union[str, Iterable[Union[str, Quantity]], Mapping[str, Any]]


def watch(model, optimizer, loss_fn=None, logdir=None, quantities: QuantitySpec = "default", **options) -> "Cockpit":
    """Attach a cockpit to an existing training loop; see :class:`Cockpit`."""
    return Cockpit(model, optimizer, loss_fn=loss_fn, logdir=logdir, quantities=quantities, **options)


class _Outcome:
    failed: Optional[BaseException] = None  # what this process raised (or the out-of-step mismatch)
    anywhere: bool = False  # whether it failed in any process

    def fail(self, err: BaseException) -> None:
        """Keep ``err`` without its traceback: the traceback holds the frame that holds this outcome
        (a reference cycle keeping the step's context and captured tensors alive until a gc run)."""
        if self.failed is None:
            self.failed = err.with_traceback(None)


@contextmanager
def _bracket(dist, step: int, phase: str):
    """Run a quantity's call as one phase of the processes' reductions (``distributed.Group``): every
    process announces its end, raised or not; an out-of-step mismatch is reported as the failure."""
    outcome = _Outcome()
    if dist is not None:
        dist.enter(step, phase)
    yield outcome
    if dist is not None:
        try:
            outcome.anywhere = dist.end(outcome.failed is not None)
        except OutOfStep as err:
            outcome.fail(err)
            outcome.anywhere = True
    else:
        outcome.anywhere = outcome.failed is not None


def _autocast_state():
    """(device type, dtype) of the torch.autocast region the model is called in, or None."""
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                return device, torch.get_autocast_dtype(device)
        except (TypeError, RuntimeError, AttributeError):  # pragma: no cover - older torch
            return None
    return None


class Cockpit:
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
        fsync: also ``fsync`` every record (survives power loss, not only a killed process).
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
    """

    def __init__(self, model, optimizer, loss_fn=None, logdir=None, quantities: QuantitySpec = "default",
                 *, fsync: bool = False, sinks: Iterable[Any] = (), tensorboard: bool = False,
                 advisor: Union[bool, Mapping[str, Any]] = False, dashboard: Union[None, bool, str] = None,
                 distributed: Any = "auto", if_exists: str = "error"):
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
        model = unwrap(model)  # DDP: hooks and parameter names on the user's module
        group = detect(distributed)
        # torch.compile: the hooks stay on the compiled wrapper (they run outside its graph); names and
        # the curvature's re-evaluation use the original module (compiled graphs have no double backward)
        inner = _uncompiled(model)
        self.compiled = inner is not model
        names, params = _observed_parameters(inner, optimizer)
        if loss_fn is not None and not isinstance(loss_fn, torch.nn.Module):
            warnings.warn(
                "loss_fn is a plain function, which cockpit-lite cannot observe; pass the loss as an "
                "nn.Module (e.g. nn.CrossEntropyLoss()) and call that object in the loop. "
                "'loss' and per-sample quantities will be reported as unavailable.",
                stacklevel=3,
            )
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.reduction = getattr(loss_fn, "reduction", "unknown") if isinstance(loss_fn, torch.nn.Module) else "unknown"
        self.quantities: List[Quantity] = _resolve_quantities(quantities)
        self.watched = Watched(inner, optimizer, names, params, loss_fn, group)
        self.logdir = os.fspath(logdir) if logdir is not None else os.path.join(
            "runs", datetime.now().strftime("%Y%m%d-%H%M%S-%f"))
        self.writes = group is None or group.rank == 0  # one log per run: process 0 writes it
        header = self._header()
        if self.writes:
            self._writer = RunLogWriter(self.logdir, header, fsync=fsync, if_exists=if_exists)
            self.logdir = os.fspath(self._writer.logdir)  # LOGDIR-2, ... with if_exists="increment"
        else:
            self._writer = _NoLog(self.logdir)
        self._sinks = list(sinks) if self.writes else []
        if not self.writes:
            tensorboard = advisor = dashboard = False
        if tensorboard:
            from .tensorboard.writer import TensorBoardSink

            self._sinks.append(TensorBoardSink(self.logdir))
        if advisor:
            from .advisor.live import AdvisorSink

            self._sinks.append(AdvisorSink(self.logdir, self._event,
                                           thresholds=dict(advisor) if isinstance(advisor, Mapping) else None))
        self._live = None
        if dashboard:
            from .live import LiveDashboard

            png = os.path.join(self.logdir, "cockpit.png") if dashboard is True else os.fspath(dashboard)
            self._live = LiveDashboard(self.logdir, png).start()
        self._layer_capture = None  # created on first need (cockpit_lite.persample.capture)
        self._model_calls: List[Any] = []
        self.step = 0
        self.closed = False
        self._warned: set = set()
        self._open_forwards: List[dict] = []  # forwards of the model begun and not yet returned (kept across steps)
        self._rule_check_failures = 0  # steps on which the per-sample self-check failed (retried up to 3)
        self._quiet = 0  # > 0 while the hooks ignore what runs (later closure evaluations of one step)
        self._reset_step_state()
        for q in self.quantities:
            q.start(self.watched)
        self._before_buffers: Optional[List[torch.Tensor]] = None
        self._handles = [
            model.register_forward_pre_hook(self._on_model_forward_pre, with_kwargs=True),
            model.register_forward_hook(self._on_model_forward, always_call=True),  # also when it raises
            optimizer.register_step_pre_hook(self._on_step_pre),
            optimizer.register_step_post_hook(self._on_step_post),
        ]
        if isinstance(loss_fn, torch.nn.Module):
            self._handles.append(loss_fn.register_forward_hook(self._on_loss, with_kwargs=True))
            _WATCHED_LOSSES.add(loss_fn)
        self._patch_zero_grad()
        _WATCHED_MODELS.add(model)

    # -- public ---------------------------------------------------------------------------------
    @property
    def log_path(self) -> str:
        return str(self._writer.path)

    def load(self):
        """The run log as written so far (see :func:`cockpit_lite.load`)."""
        return load(self.logdir)

    def close(self) -> None:
        """Remove every hook, flush and close the run log. Calling it twice is an error."""
        if self.closed:
            raise RuntimeError("this cockpit is already closed")
        self.closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        self._unpatch_zero_grad()
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
        self._writer.close({"steps": self.step, "closed": _now()})
        for sink in self._sinks:
            try:
                sink.close()
            except Exception as err:
                warnings.warn(f"cockpit-lite: closing {type(sink).__name__} failed: {err!r}", RuntimeWarning)
        _WATCHED_MODELS.discard(self.model)
        if isinstance(self.loss_fn, torch.nn.Module):
            _WATCHED_LOSSES.discard(self.loss_fn)
        self._before_buffers = None
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
        self._backward_passes = 0
        self._t_start: Optional[float] = None
        self._overhead = 0.0
        self._ctx: Optional[StepContext] = None
        self._model_calls = []
        self._last_output = None  # weak reference to the model's last training output (persample/output_view.py)
        if getattr(self, "_layer_capture", None) is not None:
            self._layer_capture.disarm()  # drop what an unfinished/skipped step captured

    def _activate(self) -> List[Quantity]:
        """Quantities active on the current step (decided once per step)."""
        if self._active is None:
            self._active = [q for q in self.quantities if q.is_active(self.step)]
            needs = set()
            for q in self._active:
                needs |= q.needs
            if "layer_io" in needs:  # the self-check and the per-sample replay (persample/replayed.py) re-run it
                needs.add("model_inputs")
            if needs & {"layer_io", "model_inputs"}:
                needs.add("loss_inputs")
            self._needs = frozenset(needs)
        return self._active

    def _pending_backward(self) -> bool:
        return self._backward_passes > 0 or any(m.backpropagated for m in self._micro_batches)

    # -- hooks ----------------------------------------------------------------------------------
    def _on_model_forward_pre(self, module, args, kwargs):
        if not torch.is_grad_enabled() or is_replaying() or self._quiet:
            return None
        if self._pending_backward() and all(p.grad is None for p in self.watched.params):
            # gradients were cleared (model.zero_grad) after backward without an optimizer step
            self._record_skipped("gradients were cleared after backward() without optimizer.step()")
        if self._open_forwards:
            # a forward inside a forward of the same module: the outer one was a redirection (Lightning's
            # DDP strategy calls training_step through the wrapped module's forward), the inner one is the
            # model's forward on the batch. Only the inner one counts.
            outer = self._open_forwards[-1]
            if outer["call"] is not None and outer["call"] in self._model_calls:
                self._model_calls.remove(outer["call"])
            outer["nested"] = True
        self._open_forwards.append({"call": None, "nested": False})
        self._last_output = None
        if self._t_start is None:
            self._t_start = time.perf_counter()
            self._activate()
            if "layer_io" in self._needs:
                self._arm_layer_capture()
        if "model_inputs" in self._needs:
            from .step_context import ModelCall

            call = ModelCall(
                args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                kwargs={k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                rng_state=rng_state(), autocast=_autocast_state())
            self._model_calls.append(call)
            self._open_forwards[-1]["call"] = call
        return None

    def _arm_layer_capture(self) -> None:
        if self._layer_capture is None:
            from .persample.capture import LayerCapture

            self._layer_capture = LayerCapture(self.model, self.watched.names, self.watched.params)
            if self.compiled:
                self._warn_once("compiled", (
                    "cockpit-lite: the model is compiled (torch.compile). Per-sample quantities hook every "
                    "layer, which breaks the compiled graph on the steps they track (dynamo recompiles when "
                    "tracking starts and stops); their values are right, those steps run slower. Track them "
                    "less often, or watch the model before compiling it for exact graphs."))
        self._layer_capture.arm()

    def _on_model_forward(self, module, args, output):
        if not torch.is_grad_enabled() or is_replaying() or self._quiet:
            return None
        if self._open_forwards and self._open_forwards.pop()["nested"]:
            return None  # a redirection around the real forward (see _on_model_forward_pre)
        if "loss_inputs" in self._needs:
            self._last_output = _output_ref(output)
        if isinstance(output, torch.Tensor):
            if output.requires_grad:
                output.register_hook(self._count_backward)
            return None
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._count_backward)
                break
        return None

    def _count_backward(self, grad):
        self._backward_passes += 1
        return None

    def _on_loss(self, module, args, kwargs, output):
        if (not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad)
                or is_replaying() or self._quiet):
            return None
        if kwargs:  # crit(input=..., target=...): the per-sample losses re-evaluate it with positions
            args = _positional(module, args, kwargs)
        if output.numel() != 1:
            self._warn_once("loss_shape", f"loss_fn returned a tensor of shape {tuple(output.shape)}, not a scalar; "
                                          "its mean is logged as the loss")
        t0 = time.perf_counter()
        self._activate()
        first = args[0] if args else None
        mb = MicroBatch(
            loss=output.detach().mean(),
            batch_size=int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None,
        )
        if "loss_inputs" in self._needs:
            from .persample.output_view import observe

            observe(mb, self._last_output() if self._last_output is not None else None, first)
            self._last_output = None
            mb.output = first.detach() if isinstance(first, torch.Tensor) else first
            mb.target = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])

        def on_loss_grad(grad, mb=mb):
            mb.loss_scale = grad.detach()
            mb.backpropagated = True

        output.register_hook(on_loss_grad)
        self._micro_batches.append(mb)
        self._overhead += time.perf_counter() - t0
        return None

    def _on_step_pre(self, optimizer, args, kwargs):
        """Before the parameters change. With ``optimizer.step(closure)`` (e.g. Lightning) the closure
        computes the gradients inside the step, after this hook: the closure is then replaced by one
        that runs it and observes once it returns (an optimizer evaluating the closure several times,
        like L-BFGS, is observed at its first evaluation)."""
        positional = len(args) > 1 and args[0] is optimizer
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if positional else None)
        if closure is None:
            self._before_step()
            return None
        done = []

        def closure_then_observe():
            if done:  # a later evaluation of the same step (L-BFGS): not a new step, not a skipped one
                self._quiet += 1
                try:
                    return closure()
                finally:
                    self._quiet -= 1
            result = closure()
            done.append(True)
            self._before_step()
            return result

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_then_observe)
        return (args[0], closure_then_observe) + tuple(args[2:]), kwargs

    def _before_step(self) -> None:
        t0 = time.perf_counter()
        active = self._activate()
        if not active:
            return None
        ctx = StepContext(self.step, self.watched, self._micro_batches, self.reduction)
        ctx.cache["t_start"] = self._t_start
        ctx.model_calls = self._model_calls
        ctx.active = list(active)  # lets shared work be planned (e.g. ctx.per_sample fuses per-layer passes)
        if self._layer_capture is not None and "layer_io" in self._needs:
            ctx.layer_io = self._layer_capture.disarm()
        self._ctx = ctx
        if "update" in self._needs:
            with torch.no_grad():
                if self._before_buffers is None:
                    self._before_buffers = [torch.empty_like(p) for p in self.watched.params]
                torch._foreach_copy_(self._before_buffers, self.watched.params)
            ctx.params_before = self._before_buffers
        if ctx.layer_io is not None and self.watched.rule_check is None:
            self._check_rules(ctx)
        for q in active:
            self._call(q, "before_step", ctx)
        self._overhead += time.perf_counter() - t0
        return None

    def _on_step_post(self, optimizer, args, kwargs):
        t0 = time.perf_counter()
        ctx = self._ctx
        if ctx is not None:
            ctx.cache["t_hook"] = t0
            ctx.cache["t_overhead"] = self._overhead
            for q in self._active:
                self._call(q, "after_step", ctx)
            self._write_step(ctx)
        self.step += 1
        self._reset_step_state()
        return None

    def _check_rules(self, ctx: StepContext) -> None:
        from .persample import selfcheck

        with _bracket(self.watched.dist, ctx.step, "persample_check") as bracket:
            try:
                outcome = selfcheck.run(ctx)
            except Exception as err:
                bracket.fail(err)
        if bracket.anywhere:  # never stops training: tried again on the next per-sample steps, then given up
            self._rule_check_failures += 1
            if self._rule_check_failures >= 3:  # the same count everywhere: the same decision
                err = bracket.failed or RuntimeError("the check failed in another process")
                outcome = {"status": "unavailable", "reason": f"{type(err).__name__}: {err}", "step": ctx.step}
                self.watched.rule_check = outcome  # the values stand unverified, as logged
                ctx.emit_data("persample_check", outcome)
            else:
                self.watched.rule_check = None
                self.watched.rule_failures.clear()
                ctx.data.pop("persample_check", None)
                return
        lost = {n: why for n, why in (outcome or {}).get("failed", {}).items() if n not in outcome.get("replayed", ())}
        if outcome is not None and outcome["status"] == "failed" and lost:
            self._warn_once("rules", "cockpit-lite: per-sample values are unavailable (NaN) for " + "; ".join(
                f"{name}: {why}" for name, why in lost.items()))

    # -- records --------------------------------------------------------------------------------
    def _call(self, q: Quantity, method: str, ctx: StepContext) -> None:
        dist = self.watched.dist
        if dist is None or not q.reduces or getattr(type(q), method) is getattr(Quantity, method):
            try:  # one process (the hot path: no bracket)
                getattr(q, method)(ctx)
            except Exception as err:  # a failing quantity never stops training
                self._failed(q, method, ctx, err)
            return
        with _bracket(dist, ctx.step, f"{q.name}.{method}") as outcome:
            try:
                getattr(q, method)(ctx)
            except Exception as err:
                outcome.fail(err)
        if outcome.failed is not None:
            self._failed(q, method, ctx, outcome.failed)

    def _failed(self, q: Quantity, method: str, ctx: StepContext, failed: BaseException) -> None:
        reason = f"{type(failed).__name__} in {q.name}.{method}: {failed}"
        ctx.discard(q.name)  # what it emitted before failing may be half-done (or paired wrongly)
        ctx.emit_nan(q.name, reason)
        self._warn_once(f"fail:{q.name}", f"cockpit-lite: quantity {q.name!r} failed ({reason}); "
                                          "it is logged as NaN with this reason")

    def _write_step(self, ctx: StepContext) -> None:
        values = ctx.scalar_values()
        flags = set(ctx.flags)
        if not _finite(values.get("loss")) and "loss" in values and "loss" not in ctx.reasons:
            flags.add("nonfinite_loss")
        if not _finite(values.get("grad_norm")) and "grad_norm" in values and "grad_norm" not in ctx.reasons:
            flags.add("nonfinite_grad")
        for flag in sorted(flags):
            if flag.startswith("nonfinite"):
                self._warn_once(flag, f"cockpit-lite: {flag.replace('_', ' ')} at step {ctx.step} (logged and flagged)")
        record = {"type": "step", "step": ctx.step, "wall": time.time(),
                  "backward_passes": max(self._backward_passes, sum(m.backpropagated for m in ctx.micro_batches)),
                  "values": values}
        samples = sum(m.batch_size or 0 for m in ctx.micro_batches if m.backpropagated)
        if self.watched.dist is None:
            if samples:
                record["samples"] = samples
        elif "samples_global" in ctx.cache:  # counted by the loss quantity's reduction
            record["samples"] = ctx.cache["samples_global"]
        elif samples:
            record["samples_local"] = samples  # this process's shard only (no reduction counted the rest)
        if ctx.reasons:
            record["reasons"] = ctx.reasons
        if ctx.data:
            record["data"] = ctx.data
        if flags:
            record["flags"] = sorted(flags)
        # amendments first: they complete earlier steps (the reader merges them by step)
        self._write_amendments(ctx, record["wall"])
        self._emit_record(record)

    def _write_amendments(self, ctx: StepContext, wall: float) -> None:
        for step, late in sorted(ctx.late.items()):
            amend = {"type": "step", "step": step, "amends": True, "wall": wall, "values": late["values"]}
            for part in ("reasons", "data"):
                if late[part]:
                    amend[part] = late[part]
            self._emit_record(amend)

    def _finish_quantities(self) -> None:
        """At close, quantities with a ``finish(ctx)`` method record what only the end of the run
        resolves (values of earlier steps, via ``ctx.emit_for_step``); written as amendments."""
        ctx = StepContext(self.step, self.watched, [], self.reduction)
        for q in self.quantities:
            finish = getattr(q, "finish", None)
            if finish is None:
                continue
            try:
                finish(ctx)
            except Exception as err:  # closing must not fail because one quantity does
                self._event("warning", f"quantity {q.name!r} failed to finish: {err!r}")
        self._write_amendments(ctx, time.time())

    def _emit_record(self, record: Dict[str, Any]) -> None:
        """Write a record to the run log, then hand it to every sink (a failing sink is dropped).
        A failing write never reaches the training loop (the writer retries or counts it)."""
        try:
            self._writer.write(record)
        except Exception as err:  # e.g. a record the encoder refuses: lost, counted, said once
            self._writer.dropped = getattr(self._writer, "dropped", 0) + 1
            if "log" not in self._warned:
                self._warned.add("log")
                warnings.warn(f"cockpit-lite: a {record.get('type')} record could not be written to the run log "
                              f"({err!r}); it was dropped (the footer counts it)", RuntimeWarning, stacklevel=3)
        for sink in list(self._sinks):
            try:
                sink.write(record)
            except Exception as err:
                self._sinks.remove(sink)
                self._warn_once(f"sink:{type(sink).__name__}",
                                f"cockpit-lite: {type(sink).__name__} failed ({err!r}) and was detached; "
                                "the run log is unaffected")

    def _record_skipped(self, reason: str) -> None:
        nonfinite = _nonfinite_grad_names(self.watched)
        if nonfinite:
            reason = (f"{reason}; gradients were not finite in {', '.join(nonfinite[:5])}"
                      f"{' ...' if len(nonfinite) > 5 else ''} (a GradScaler skips such steps)")
        losses = [float(m.loss) for m in self._micro_batches]
        record = {"type": "skipped", "step": self.step, "wall": time.time(), "reason": reason,
                  "backward_passes": self._backward_passes}
        if losses:
            record["loss"] = sum(losses) / len(losses)
        self._emit_record(record)
        for q in self._active or ():
            q.on_skipped(self.step, reason)
        self.step += 1
        self._reset_step_state()

    def _event(self, level: str, message: str, **fields: Any) -> None:
        if not self._writer.closed:
            self._emit_record({"type": "event", "step": self.step, "wall": time.time(), "level": level,
                               "message": message, **fields})

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        self._event("warning", message)

    # -- zero_grad: where a step without optimizer.step() shows ------------------------------------
    def _zero_grad_owners(self) -> list:
        """The optimizer and the model (as passed, and unwrapped): their ``zero_grad`` after a backward
        pass without ``optimizer.step()`` marks a skipped step (e.g. a GradScaler that found inf/NaN),
        also with ``set_to_none=False``, where the gradients stay tensors."""
        owners = [self.optimizer, self.model]
        inner = self.watched.model
        if all(inner is not o for o in owners):
            owners.append(inner)
        return owners

    def _patch_zero_grad(self) -> None:
        cockpit_ref = weakref.ref(self)
        self._zero_grad_patches = []
        for owner in self._zero_grad_owners():
            original = owner.zero_grad  # may be another cockpit's patch (one optimizer, two models): chained
            was_instance_attribute = "zero_grad" in owner.__dict__

            def zero_grad(*args, _original=original, **kwargs):
                cockpit = cockpit_ref()
                if cockpit is not None and not cockpit.closed and not cockpit._quiet and cockpit._pending_backward():
                    cockpit._record_skipped("zero_grad() was called after backward() without optimizer.step()")
                return _original(*args, **kwargs)

            object.__setattr__(owner, "zero_grad", zero_grad)
            self._zero_grad_patches.append((owner, zero_grad, original if was_instance_attribute else None))

    def _unpatch_zero_grad(self) -> None:
        for owner, patch, previous in self._zero_grad_patches:
            if owner.__dict__.get("zero_grad") is not patch:
                continue  # wrapped again since (e.g. by a later cockpit): that one restores it
            if previous is None:
                object.__delattr__(owner, "zero_grad")
            else:
                object.__setattr__(owner, "zero_grad", previous)
        self._zero_grad_patches = []

    def _header(self) -> Dict[str, Any]:
        w = self.watched
        return {
            "created": _now(),
            "cockpit_lite": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "host": platform.node(),
            "model": type(self.model).__name__,
            "optimizer": type(self.optimizer).__name__,
            "optimizer_defaults": {k: _jsonable(v) for k, v in self.optimizer.defaults.items()},
            "param_groups": len(self.optimizer.param_groups),
            "loss_fn": type(self.loss_fn).__name__ if self.loss_fn is not None else None,
            "reduction": self.reduction,
            "params": [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in zip(w.names, w.params)],
            "num_params": sum(p.numel() for p in w.params),
            "processes": w.dist.size if w.dist is not None else 1,
            "quantities": {q.name: q.describe() for q in self.quantities},
        }


# -- helpers ------------------------------------------------------------------------------------
class _NoLog:
    """The run log of a process other than 0 in a data-parallel run: process 0 writes the records."""

    def __init__(self, logdir: str):
        self.path = os.path.join(logdir, "cockpit.jsonl")
        self.closed = False

    def write(self, record) -> None:
        pass

    def close(self, footer=None) -> None:
        self.closed = True


def _positional(module, args, kwargs) -> tuple:
    """The arguments of a loss module's call as positions of its ``forward`` (keywords included), as far
    as they go without a gap; ``args`` as given where the signature cannot bind them."""
    try:
        sig = inspect.signature(module.forward)
        bound = sig.bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        return args
    out = []
    for name, param in sig.parameters.items():
        if param.kind not in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD) or name not in bound:
            break
        out.append(bound[name])
    return tuple(out)


def _observed_parameters(model, optimizer):
    model_params = list(model.named_parameters())
    if not model_params:
        raise ValueError(f"the model ({type(model).__name__}) has no parameters: there is nothing to observe")
    name_of = {id(p): n for n, p in model_params}
    names, params, seen = [], [], set()
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) in seen:
                continue
            seen.add(id(p))
            names.append(name_of.get(id(p), f"optimizer.group{g}.param{i}"))
            params.append(p)
    if not any(id(p) in name_of for p in params):
        raise ValueError(
            "the optimizer does not hold any parameter of the model; build it from model.parameters() "
            "of the model you pass to watch()"
        )
    missing = [n for n, p in model_params if p.requires_grad and id(p) not in seen]
    if missing:
        warnings.warn(
            f"{len(missing)} trainable parameter(s) of the model are not in the optimizer "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); they are not observed",
            stacklevel=4,
        )
    return names, params


def _uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The original module of a ``torch.compile``d one (``OptimizedModule._orig_mod``), else ``model``."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, torch.nn.Module) and type(model).__name__ == "OptimizedModule" else model


def _resolve_quantities(spec: QuantitySpec) -> List[Quantity]:
    if isinstance(spec, str):
        spec = presets.preset(spec)
    out: List[Quantity] = []
    if isinstance(spec, Mapping):
        for name, schedule in spec.items():
            out.append(qreg.make(name, schedule))
    else:
        for item in spec:
            out.append(item if isinstance(item, Quantity) else qreg.make(item))
    names = [q.name for q in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"quantities listed twice: {sorted(dupes)}")
    return out


def _nonfinite_grad_names(watched) -> List[str]:
    bad = []
    with torch.no_grad():
        for n, p in zip(watched.names, watched.params):
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                bad.append(n)
    return bad


def _output_ref(output):
    """A weak reference to the model output's first tensor (the loss input may be a view of it)."""
    leaf = output if isinstance(output, torch.Tensor) else next(
        (x for x in tree_leaves(output) if isinstance(x, torch.Tensor)), None)
    return weakref.ref(leaf) if leaf is not None else None


def _finite(x) -> bool:
    return x is not None and math.isfinite(x)


def _jsonable(v):
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return float(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return repr(v)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
