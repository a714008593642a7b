"""Run a function once a backward pass has finished, after every other end-of-backward callback.

``queue_after_backward(fn)`` must be called while autograd runs a backward pass (from a tensor hook).
It queues a callback on the autograd engine that queues ``fn`` again: the engine runs its final
callbacks in order, including those queued while they run, so ``fn`` runs after every callback that
was queued during the pass. DistributedDataParallel queues its ``finalize_backward`` (which waits for
the gradients' all-reduce and writes the averaged ``.grad``) during the pass: ``fn`` sees its result.
"""

from __future__ import annotations

from typing import Callable

from torch.autograd import Variable


def queue_after_backward(fn: Callable[[], None]) -> None:
    engine = Variable._execution_engine

    def then_fn() -> None:
        engine.queue_callback(fn)

    engine.queue_callback(then_fn)
