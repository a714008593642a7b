"""Marks re-evaluations of a step (curvature products, the per-sample self-check).

They call the model and the loss function again, and a model that computes its loss inside
``forward`` (the Hugging Face style) calls the watched loss module from there: the cockpit's hooks
must not take those calls for training ones (an extra micro-batch, a forward). Every cockpit's hooks
return at once while ``replaying()`` is active.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

_state = threading.local()


@contextmanager
def replaying():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def is_replaying() -> bool:
    return getattr(_state, "depth", 0) > 0
