"""From a finished step to the run log and the sinks: the step record, amendments of earlier steps,
events and once-only warnings, the log header. A failing write or sink never reaches the training loop."""

from __future__ import annotations

import os
import platform
import time
import warnings
from typing import Any, Dict, Iterable

import torch

from .. import __version__
from .setup import finite, jsonable, now


class Recorder:
    """Writes records to the run log (``RunLogWriter``, or ``NoLog`` off process 0) and every sink."""

    def __init__(self, writer, sinks: Iterable[Any] = ()):
        self.writer = writer
        self.sinks = list(sinks)
        self.warned: set = set()
        #: quantity name -> the parts it has logged (``grad_norm/fc.weight``, ``hess_max_ev/hvps``): a step on
        #: which the quantity fails as a whole gives each of them NaN with the same reason
        self.parts: Dict[str, set] = {}
        self._logged: set = set()  # every value key written so far
        self._pid = os.getpid()  # a forked child writes nothing: not the log (runlog/batch.py), not the sinks

    def open_sinks(self, run_header: Dict[str, Any]) -> None:
        """Hand the run's header to every sink that asks for it (``open_run``, e.g. its parameter names);
        a sink that fails here is detached with a warning and never stops training."""
        for sink in list(self.sinks):
            try:
                if callable(getattr(sink, "open_run", None)):
                    sink.open_run(run_header)
            except Exception as err:
                self.sinks.remove(sink)
                warnings.warn(f"cockpit-lite: {type(sink).__name__} failed ({err!r}) and was detached",
                              RuntimeWarning, stacklevel=4)

    def emit(self, record: Dict[str, Any]) -> None:
        """Write a record to the run log, then hand it to every sink (a failing sink is dropped).
        A failing write never reaches the training loop (the writer retries or counts it)."""
        try:
            self.writer.write(record)
        except Exception as err:  # e.g. a record the encoder refuses: lost, counted, said once
            self.writer.dropped = getattr(self.writer, "dropped", 0) + 1
            if "log" not in self.warned:
                self.warned.add("log")
                warnings.warn(f"cockpit-lite: a {record.get('type')} record could not be written to the run log "
                              f"({err!r}); it was dropped (the footer counts it)", RuntimeWarning, stacklevel=4)
        self._each_sink(lambda sink: sink.write(record), record.get("step", 0))

    def flush_sinks(self) -> None:
        """Ask every sink that can to write what it holds (TensorBoard's event file); a failing one is detached."""
        self._each_sink(lambda sink: sink.flush() if callable(getattr(sink, "flush", None)) else None, 0)

    def _each_sink(self, act, step: int) -> None:
        """``act(sink)`` for every sink; one that raises is detached with a warning (the run log is unaffected).
        Nothing in a forked child: the sinks' files (TensorBoard's event file) are the parent's."""
        if os.getpid() != self._pid:
            return
        for sink in list(self.sinks):
            try:
                act(sink)
            except Exception as err:
                self.sinks.remove(sink)
                self.warn_once(f"sink:{type(sink).__name__}",
                               f"cockpit-lite: {type(sink).__name__} failed ({err!r}) and was detached; "
                               "the run log is unaffected", step=step)

    def event(self, step: int, level: str, message: str, **fields: Any) -> None:
        if not self.writer.closed:
            self.emit({"type": "event", "step": step, "wall": time.time(), "level": level,
                       "message": message, **fields})

    def warn_once(self, key: str, message: str, step: int, stacklevel: int = 4) -> None:
        if key in self.warned:
            return
        self.warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)
        self.event(step, "warning", message)

    def write_step(self, ctx, backward_passes: int, dist) -> None:
        """One ``step`` record for the tracked step ``ctx``, after the amendments it carries."""
        values = ctx.scalar_values()
        new = values.keys() - self._logged  # a set difference in C: the same keys step after step cost ~nothing
        if new:
            self._logged |= new
            for key in new:
                name, sep, _ = key.partition("/")
                if sep:
                    self.parts.setdefault(name, set()).add(key)
        flags = set(ctx.flags)
        if not finite(values.get("loss")) and "loss" in values and "loss" not in ctx.reasons:
            flags.add("nonfinite_loss")
        if not finite(values.get("grad_norm")) and "grad_norm" in values and "grad_norm" not in ctx.reasons:
            flags.add("nonfinite_grad")
        unlabelled = [k for k, v in values.items() if not finite(v) and k not in ctx.reasons]
        if unlabelled:  # every NaN carries a reason: the step's own non-finite numbers, where no quantity gave one
            why = _nonfinite_reason(values, flags)
            for key in unlabelled:
                ctx.reasons[key] = why
        for flag in sorted(flags):
            if flag.startswith("nonfinite"):
                self.warn_once(flag, f"cockpit-lite: {flag.replace('_', ' ')} at step {ctx.step} (logged and flagged)",
                               step=ctx.step, stacklevel=5)
        record = {"type": "step", "step": ctx.step, "wall": time.time(),
                  "backward_passes": max(backward_passes, sum(m.backpropagated for m in ctx.micro_batches)),
                  "values": values}
        samples = sum(m.batch_size or 0 for m in ctx.micro_batches if m.backpropagated and not m.repeats)
        if samples and ctx.watched.seq_first is not None:
            # dim 0 of the loss input counts positions there: the per-sample view's count when it read the
            # batch along dim 1 on this step, else no count (never T logged as the number of samples)
            view = ctx.per_sample_if_built()
            samples = view.n_local if view is not None and view.sample_dim == 1 else 0
            if not samples:
                self.warn_once("samples_seq_first", f"cockpit-lite: the record's 'samples' is left out on steps "
                               f"where the number of samples cannot be told: {ctx.watched.seq_first} reads dim 1 as "
                               "the batch, so the loss input's dim 0 need not count samples (it is logged on steps "
                               "whose per-sample quantities read the batch along dim 1)", step=ctx.step)
        if dist is None:
            if samples:
                record["samples"] = samples
        elif ctx.samples_global is not None:  # counted by the loss quantity's reduction
            record["samples"] = ctx.samples_global
        elif samples:
            record["samples_local"] = samples  # this process's shard only (no reduction counted the rest)
        if ctx.reasons:
            record["reasons"] = {k: capped(v) for k, v in ctx.reasons.items()}
        if ctx.data:
            record["data"] = ctx.data
        if flags:
            record["flags"] = sorted(flags)
        # amendments first: they complete earlier steps (the reader merges them by step)
        self.write_amendments(ctx, record["wall"])
        self.emit(record)

    def write_amendments(self, ctx, wall: float) -> None:
        for step, late in sorted(ctx.late.items()):
            amend = {"type": "step", "step": step, "amends": True, "wall": wall, "values": late["values"]}
            for part in ("reasons", "data"):
                if late[part]:
                    amend[part] = late[part]
            self.emit(amend)

    def close(self, footer: Dict[str, Any]) -> None:
        """Close the run log with ``footer``, then every sink (a failing sink is said, not raised)."""
        self.writer.close(footer)
        if os.getpid() != self._pid:  # a forked child's copies of the sinks: closing them would flush into the
            return  # parent's files
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as err:
                warnings.warn(f"cockpit-lite: closing {type(sink).__name__} failed: {err!r}", RuntimeWarning)


#: characters of a logged reason: beyond, its middle is cut (a torch error quoted whole reached 6,000 characters,
#: once per key and step: a checkpointed model's replay failure)
MAX_REASON = 1500


def capped(reason: Any) -> Any:
    """``reason`` with its middle cut where it is longer than ``MAX_REASON`` characters: the start says what failed
    and the end names the last cause (the parameters it also holds for)."""
    if not isinstance(reason, str) or len(reason) <= MAX_REASON:
        return reason
    head, tail = MAX_REASON * 2 // 3, MAX_REASON // 4
    return f"{reason[:head]} [… {len(reason) - head - tail} characters cut …] {reason[-tail:]}"


def _nonfinite_reason(values: Dict[str, float], flags) -> str:
    """Why a value no quantity explained is not finite: the parameters are, or the step's gradient or loss."""
    if "param_norm" in values and not finite(values["param_norm"]):
        return "the parameters are not finite (a non-finite update on an earlier step)"
    if "nonfinite_grad" in flags:
        return "the step's gradients are not finite (flagged nonfinite_grad)"
    if "nonfinite_loss" in flags:
        return "the step's loss is not finite on its batch (flagged nonfinite_loss)"
    return "not finite on this step (no quantity said why)"


class NoLog:
    """The run log of a process other than 0 in a data-parallel run: process 0 writes the records."""

    def __init__(self, logdir: str):
        self.path = os.path.join(logdir, "cockpit.jsonl")
        self.closed = False

    def write(self, record) -> None:
        pass

    def close(self, footer=None) -> None:
        self.closed = True


def header(model, optimizer, loss_fn, reduction: str, watched, quantities) -> Dict[str, Any]:
    """The run log's first record: versions, host, model, optimizer, parameters, quantities."""
    return {
        "created": now(),
        "cockpit_lite": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "model": type(model).__name__,
        "optimizer": type(optimizer).__name__,
        "optimizer_defaults": {k: jsonable(v) for k, v in optimizer.defaults.items()},
        "param_groups": len(optimizer.param_groups),
        "loss_fn": type(loss_fn).__name__ if loss_fn is not None else None,
        "reduction": reduction,
        "params": [{"name": n, "shape": list(p.shape), "numel": p.numel()} for n, p in zip(watched.names, watched.params)],
        "num_params": sum(p.numel() for p in watched.params),
        "processes": watched.dist.size if watched.dist is not None else 1,
        "quantities": {q.name: q.describe() for q in quantities},
    }
