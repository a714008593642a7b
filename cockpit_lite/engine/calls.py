"""Calling a quantity's hook: a failure never stops training, and in a data-parallel run every
process agrees whether the call failed anywhere (``distributed.Group``'s phases)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

from ..distributed import OutOfStep
from ..quantities.base import Quantity


class Outcome:
    failed: Optional[BaseException] = None  # what this process raised (or the out-of-step mismatch)
    anywhere: bool = False  # whether it failed in any process

    def fail(self, err: BaseException) -> None:
        """Keep ``err`` without its traceback: the traceback holds the frame that holds this outcome
        (a reference cycle keeping the step's context and captured tensors alive until a gc run)."""
        if self.failed is None:
            self.failed = err.with_traceback(None)


@contextmanager
def bracket(dist, step: int, phase: str):
    """Run a quantity's call as one phase of the processes' reductions (``distributed.Group``): every
    process announces its end, raised or not; an out-of-step mismatch is reported as the failure."""
    outcome = Outcome()
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


def _bracketed(q: Quantity, method: str, dist) -> bool:
    """Whether ``q.<method>`` may reduce across processes (else it runs as in one process)."""
    return dist is not None and q.reduces and getattr(type(q), method) is not getattr(Quantity, method)


def call_hook(quantities: Sequence[Quantity], method: str, ctx, dist,
              on_failure: Callable[[Quantity, str, object, BaseException], None]) -> None:
    """``q.<method>(ctx)`` for each quantity; a raised error goes to ``on_failure`` (which logs it as NaN
    with a reason). In a data-parallel run each call that may reduce is a phase of ``dist`` (its checks
    are tagged with the quantity), and one closing check ends the hook (``Group.end``): a process that
    raised and skipped reductions meets the others there or at the next quantity's first check, never
    leaving one waiting. When the processes turn out out of step, the calls that returned at or after the
    lowest place any process was at (``Group.lowest_place``) are reported as failed too: no later check
    confirmed that every process made their reductions."""
    pending: List[Tuple[Quantity, int]] = []  # bracketed calls that returned, with their place in the hook
    place = 0
    for q in quantities:
        if not _bracketed(q, method, dist):
            try:  # one process, or a quantity that never reduces (the hot path: no bracket)
                getattr(q, method)(ctx)
            except Exception as err:  # a failing quantity never stops training
                on_failure(q, method, ctx, err)
            continue
        place += 1
        dist.enter(ctx.step, f"{q.name}.{method}", place)
        failed: Optional[BaseException] = None
        try:
            getattr(q, method)(ctx)
        except Exception as err:
            failed = err.with_traceback(None)  # no frame (holding the step's tensors) kept alive
        if failed is None and dist.broken:
            failed = dist.out_of_step()
        if failed is not None:
            on_failure(q, method, ctx, failed)
        else:
            pending.append((q, place))
    if not place:
        return
    if not dist.broken:
        dist.enter(ctx.step, f"{method}:close", place + 1)
        try:
            dist.end(False)
            return
        except OutOfStep:
            pass
    for q, at in pending:  # at or after the place where some process was left: not confirmed
        if at >= dist.lowest_place:
            on_failure(q, method, ctx, dist.out_of_step())
