"""The loss scale a ``torch.amp.GradScaler`` divides out of an optimizer's gradients.

Gradients at the end of a backward pass under a GradScaler are the user's gradients times the scale S.
``GradScaler.unscale_(optimizer)`` (called by the user before clipping, or by ``scaler.step``) divides
them by S. ``observe()`` wraps ``unscale_`` once, on the class, to note S for the optimizer before the
original method runs; it changes nothing else (the call, its result and its errors are the
original's). ``take(optimizer)`` returns the noted S (a tensor) and forgets it. Subclasses
(``torch.cuda.amp.GradScaler``, Lightning's and Accelerate's use) inherit the wrapped method.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch

_SCALES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # optimizer -> scale tensor


def observe() -> bool:
    """Wrap ``torch.amp.GradScaler.unscale_`` (once); False where there is no such class."""
    try:
        from torch.amp import GradScaler
    except ImportError:  # pragma: no cover - older torch
        return False
    original = GradScaler.unscale_
    if getattr(original, "_cockpit_lite_observer", False):
        return True

    @functools.wraps(original)
    def unscale_(self, optimizer, *args, **kwargs):
        try:
            scale = getattr(self, "_scale", None)
            if self.is_enabled() and isinstance(scale, torch.Tensor):
                _SCALES[optimizer] = scale.detach().clone()
        except Exception:  # observing never changes what the scaler does
            pass
        return original(self, optimizer, *args, **kwargs)

    unscale_._cockpit_lite_observer = True  # type: ignore[attr-defined]
    GradScaler.unscale_ = unscale_  # type: ignore[method-assign]
    return True


def take(optimizer) -> Optional[torch.Tensor]:
    """The scale a GradScaler divided ``optimizer``'s gradients by since the last ``take``, or None."""
    try:
        return _SCALES.pop(optimizer, None)
    except TypeError:  # not weak-referenceable
        return None
