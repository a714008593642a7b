"""Calling a quantity's hook: a failure never stops training, and in a data-parallel run every
process agrees whether the call failed anywhere (``distributed.Group``'s phases)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

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


def call_quantity(q: Quantity, method: str, ctx, dist, on_failure: Callable[[Quantity, str, object, BaseException], None]):
    """``q.<method>(ctx)``; a raised error goes to ``on_failure`` (which logs it as NaN with a reason)."""
    if dist is None or not q.reduces or getattr(type(q), method) is getattr(Quantity, method):
        try:  # one process (the hot path: no bracket)
            getattr(q, method)(ctx)
        except Exception as err:  # a failing quantity never stops training
            on_failure(q, method, ctx, err)
        return
    with bracket(dist, ctx.step, f"{q.name}.{method}") as outcome:
        try:
            getattr(q, method)(ctx)
        except Exception as err:
            outcome.fail(err)
    if outcome.failed is not None:
        on_failure(q, method, ctx, outcome.failed)
