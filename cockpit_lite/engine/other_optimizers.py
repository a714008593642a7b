"""Backward passes that belong to another optimizer's step (a GAN's generator step through the watched
discriminator, a discriminator loss back-propagated into the watched generator without ``detach()``).

Such a pass runs through the watched model and writes its ``.grad``, but no step of the watched optimizer
follows: the next ``zero_grad`` would record it as a skipped step, and every real step of an alternating
loop would be followed by a "skipped" one (step numbers twice the optimizer steps, alpha without end points).
A global optimizer step hook notes when an optimizer holding none of the watched model's parameters steps
after a pass through the watched model (``Cockpit._other_stepped``). Where the cockpit would then record a
skipped step, the pending passes are dropped instead, unless the watched gradients are not finite (a
GradScaler skip of the watched step stays a skipped step). When the watched optimizer steps, its step takes
them as usual: an optimizer of something else stepping in between (learned loss weights) changes nothing.
The hook holds the cockpit weakly.
"""

from __future__ import annotations

import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

from .setup import nonfinite_grad_names


def watch_other_optimizers(cockpit):
    """Register the global hook; returns its handle (``remove()`` at close)."""
    ref = weakref.ref(cockpit)
    model_params = {id(p) for p in cockpit.watched.model.parameters()}

    def on_any_step(optimizer, args, kwargs):
        c = ref()
        if c is None or c.closed or c._quiet or optimizer is c.optimizer or not c._pending_backward():
            return None
        if any(id(p) in model_params for group in optimizer.param_groups for p in group["params"]):
            return None  # an optimizer of (part of) the watched model: its passes may be the watched step's too
        c._other_stepped = True
        return None

    return register_optimizer_step_post_hook(on_any_step)


def passes_of_another_step(cockpit) -> bool:
    """Whether the pending passes were another optimizer's (then: not a skipped step)."""
    return cockpit._other_stepped and not nonfinite_grad_names(cockpit.watched)
