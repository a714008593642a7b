"""Backward passes that belong to another optimizer's step (a GAN's generator step through the watched
discriminator, a discriminator loss back-propagated into the watched generator without ``detach()``).

Such a pass runs through the watched model and writes its ``.grad``, but no step of the watched optimizer
follows: the next ``zero_grad`` would record it as a skipped step, and every real step of an alternating
loop would be followed by a "skipped" one (step numbers twice the optimizer steps, alpha without end points).
A global optimizer step hook sees the other optimizer step: when that optimizer holds none of the watched
model's parameters and the watched gradients are finite (a GradScaler skip of the watched step leaves
them inf/NaN and stays a skipped step), the pending passes were that optimizer's and are dropped. The hook
holds the cockpit weakly.
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
        if nonfinite_grad_names(c.watched):
            return None
        c._reset_step_state()  # the passes were the other optimizer's: not a step, not a skipped one
        return None

    return register_optimizer_step_post_hook(on_any_step)
