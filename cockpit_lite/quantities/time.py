"""``time``: wall time of the step, from the step's first forward call to the end of optimizer.step.

``time/cockpit`` is the part of it spent inside cockpit-lite's own hooks (up to the moment the
record is assembled), so that the observer's overhead is visible in every record.

``time/device`` (only when the watched parameters live on a CUDA device): seconds on the device
between the CUDA events recorded on the current stream at the end of the previous step and at the
end of this one (since ``watch`` for the first step), i.e. the step's period as the GPU sees it,
including any time the GPU waited for the host. No ``torch.cuda.synchronize()`` is added: events
of earlier steps are queried at each step end and their value is written into their step as an
amendment once they completed (at ``close``, the last ones are waited for). When the previous step
was not tracked (sparse schedule), the interval would span several steps: NaN with that reason.
On a CPU-only model the key is absent.
"""

import time as _time
from typing import Any, Callable, List, Optional, Tuple

from .base import Quantity


class _TimedCudaEvent:
    def __init__(self, index: int):
        import torch

        self.index = index
        self.event = torch.cuda.Event(enable_timing=True)

    def record(self):
        import torch

        self.event.record(torch.cuda.current_stream(self.index))

    def query(self) -> bool:
        return self.event.query()

    def synchronize(self) -> None:
        self.event.synchronize()

    def elapsed_s(self, end: "_TimedCudaEvent") -> float:
        return self.event.elapsed_time(end.event) * 1e-3


class StepTime(Quantity):
    name = "time"
    description = ("wall seconds from the step's first forward to the end of optimizer.step(); time/cockpit = own "
                   "overhead; time/device = GPU seconds between CUDA events at step ends")
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def __init__(self, schedule=None, *, make_event: Optional[Callable[[int], Any]] = None):
        super().__init__(schedule)
        self.make_event = make_event  # injectable (tests): index -> object with record/query/synchronize/elapsed_s
        self._device: Optional[int] = None
        self._last: Optional[Tuple[int, Any]] = None  # (step, event) of the last boundary
        self._pending: List[Tuple[int, Any, Any]] = []  # (step, start event, end event), in order

    def start(self, watched) -> None:
        cuda = sorted({p.device.index or 0 for p in watched.params if p.device.type == "cuda"})
        if cuda or self.make_event is not None:
            self._device = cuda[0] if cuda else 0
            self._last = (-1, self._new_event())

    def _new_event(self):
        event = (self.make_event or _TimedCudaEvent)(self._device)
        event.record()
        return event

    def after_step(self, ctx):
        flush = getattr(ctx, "flush_norms", None)
        if flush is not None:  # the norms asked for so far are computed now: their cost counts in time/cockpit
            flush()
        start = ctx.t_start
        if start is None:
            ctx.emit_nan("time", "no forward call of the model was seen before this step")
        else:
            ctx.emit("time", _time.perf_counter() - start)
        if self._device is not None:
            self._device_time(ctx)
        ctx.emit("time/cockpit", ctx.t_overhead + (_time.perf_counter() - ctx.t_hook))

    def _device_time(self, ctx) -> None:
        end = self._new_event()
        prev_step, prev_event = self._last
        self._last = (ctx.step, end)
        if prev_step == ctx.step - 1:
            self._pending.append((ctx.step, prev_event, end))
        else:
            ctx.emit_nan("time/device", f"the previous step ({ctx.step - 1}) was not tracked, so the device interval "
                                        f"since step {prev_step} would span several steps")
        while self._pending and self._pending[0][2].query():
            self._emit(ctx, *self._pending.pop(0))

    def _emit(self, ctx, step: int, start, end) -> None:
        seconds = start.elapsed_s(end)
        if step == ctx.step:
            ctx.emit("time/device", seconds)
        else:
            ctx.emit_for_step(step, "time/device", seconds)

    def on_skipped(self, step: int, reason: str) -> None:
        pass  # the next tracked step's interval then spans the skipped one: reported NaN (not consecutive)

    def finish(self, ctx) -> None:
        """End of the run: wait for the last events (the training is over) and write their values."""
        for step, start, end in self._pending:
            end.synchronize()
            self._emit(ctx, step, start, end)
        self._pending = []

    def close(self) -> None:
        self._pending = []
        self._last = None
