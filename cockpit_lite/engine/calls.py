"""Calling a quantity's hook: a failure never stops training, and in a data-parallel run every
process agrees whether the call failed anywhere (``distributed.Group``'s phases)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence, Tuple

import torch

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
    are tagged with the quantity), and one closing check ends the hook (``Group.close``): a process that
    raised and skipped reductions meets the others there or at the next quantity's first check, never
    leaving one waiting. The closing check also carries the sums the quantities declared
    (``Quantity.step_sums``, ``before_step`` only) and hands each its totals (``with_sums``). When the
    processes turn out out of step, the calls that returned at or after the lowest place any process was
    at (``Group.lowest_place``) are reported as failed too: no later check confirmed that every process
    made their reductions."""
    pending: List[Tuple[Quantity, int]] = []  # bracketed calls that returned, with their place in the hook
    declared: List[Tuple[Quantity, List[float]]] = []  # [present, *local sums] of each declaring call
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
        sums: List[float] = []
        try:
            getattr(q, method)(ctx)
            if method == "before_step" and q.step_sums:
                sums = [float(v) for v in q.local_sums(ctx)]
                if len(sums) != q.step_sums:
                    raise ValueError(f"{q.name}.local_sums gave {len(sums)} numbers, it declares {q.step_sums}")
        except Exception as err:
            failed = err.with_traceback(None)  # no frame (holding the step's tensors) kept alive
        if failed is None and dist.broken:
            failed = dist.out_of_step()
        if method == "before_step" and q.step_sums:
            declared.append((q, [1.0, *sums] if failed is None else [0.0] * (q.step_sums + 1)))
        if failed is not None:
            on_failure(q, method, ctx, failed)
        else:
            pending.append((q, place))
    if not place:
        return
    dist.enter(ctx.step, f"{method}:close", place + 1)
    totals: Optional[List[float]] = None
    closing: Optional[BaseException] = None
    try:
        totals = dist.close(torch.tensor([v for _, block in declared for v in block], dtype=torch.float64)).tolist()
    except OutOfStep as err:
        closing = err.with_traceback(None)
    unconfirmed = {id(q) for q, at in pending if dist.broken and at >= dist.lowest_place}
    for q, _ in pending:  # at or after the place where some process was left: no check confirmed it
        if id(q) in unconfirmed:
            on_failure(q, method, ctx, dist.out_of_step())
    i = 0
    for q, block in declared:
        mine, i = (totals[i:i + len(block)] if totals is not None else None), i + len(block)
        if not block[0] or id(q) in unconfirmed:
            continue  # already reported as failed here
        try:
            if mine is None:
                raise closing or dist.out_of_step()
            if mine[0] < dist.size:
                raise RuntimeError(f"{q.name} failed in {dist.size - int(mine[0])} of {dist.size} processes")
            q.with_sums(ctx, mine[1:])
        except Exception as err:
            on_failure(q, method, ctx, err.with_traceback(None))
