"""``zero_grad`` after a backward pass without ``optimizer.step()``: where a skipped step shows.

The optimizer's and the model's ``zero_grad`` (as passed and unwrapped) are wrapped per instance, so a
skip is seen also with ``set_to_none=False``, where the gradients stay tensors (e.g. a GradScaler that
found inf/NaN gradients). The wrapper holds the cockpit weakly: it never keeps a closed cockpit alive.
"""

from __future__ import annotations

import weakref
from typing import List, Tuple


def zero_grad_owners(optimizer, model, inner) -> list:
    owners = [optimizer, model]
    if all(inner is not o for o in owners):
        owners.append(inner)
    return owners


def patch_zero_grad(cockpit, owners) -> List[Tuple]:
    """Wrap each owner's ``zero_grad``; returns what ``unpatch_zero_grad`` needs to undo it."""
    cockpit_ref = weakref.ref(cockpit)
    patches = []
    for owner in owners:
        original = owner.zero_grad  # may be another cockpit's patch (one optimizer, two models): chained
        was_instance_attribute = "zero_grad" in owner.__dict__

        def zero_grad(*args, _original=original, **kwargs):
            c = cockpit_ref()
            if c is not None and not c.closed and not c._quiet and c._pending_backward():
                c._record_skipped("zero_grad() was called after backward() without optimizer.step()")
            return _original(*args, **kwargs)

        object.__setattr__(owner, "zero_grad", zero_grad)
        patches.append((owner, zero_grad, original if was_instance_attribute else None))
    return patches


def unpatch_zero_grad(patches) -> None:
    for owner, patch, previous in patches:
        if owner.__dict__.get("zero_grad") is not patch:
            continue  # wrapped again since (e.g. by a later cockpit): that one restores it
        if previous is None:
            object.__delattr__(owner, "zero_grad")
        else:
            object.__setattr__(owner, "zero_grad", previous)
