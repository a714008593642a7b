"""Whether the parameters changed between ``optimizer.step()`` and the next step.

``update_size`` and ``alpha`` take d = theta_{t+1} - theta_t as the optimizer's step. A loop that changes the
parameters in place after it (WGAN weight clipping ``p.clamp_()``, a max-norm projection, loading an EMA
copy) makes the update actually taken another one: measured on an MLP clamped to [-0.3, 0.3], update_size
0.48 for 0.54 and alpha -0.95 for -0.61. The parameters' norms after the step are kept (one multi-tensor
norm, float64 on the device) and compared with those at the next step, exactly: untouched parameters give
the same bits. A change that keeps every norm (a permutation, a sign flip) is not seen.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

REASON = ("the parameters{which} changed between optimizer.step() and the next step (changed in place by the "
          "loop, e.g. clamped, renormalised or replaced by an average): the optimizer's update is not the update "
          "taken")


def fingerprint(params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """[params] float64 norms, on the parameters' device (no transfer); None without parameters."""
    if not params:
        return None
    with torch.no_grad():
        return torch.stack([n.double() for n in torch._foreach_norm([p.detach() for p in params])])


def changed(before: Optional[torch.Tensor], params: Sequence[torch.Tensor]) -> torch.Tensor:
    """[params] bool on the device: which parameters' norms differ from ``before``."""
    now = fingerprint(params)
    if before is None or now is None or now.shape != before.shape:
        return torch.zeros(len(params), dtype=torch.bool)
    before = before.to(now.device)
    return (now != before) & ~(now.isnan() & before.isnan())  # NaN parameters that stay NaN have not moved


def differ(a: float, b: float) -> bool:
    """Whether two norms (floats) differ; NaN parameters that stay NaN have not moved."""
    return a != b and not (a != a and b != b)


def others(watched) -> tuple:
    """(names, parameters) of the model's trainable parameters outside the watched optimizer (another
    optimizer's): when they move between two steps, the second step's loss is not on the first one's update."""
    model = getattr(watched, "model", None)
    if model is None or not hasattr(model, "named_parameters"):
        return [], []
    mine = {id(p) for p in watched.params}
    pairs = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in mine]
    return [n for n, _ in pairs], [p for _, p in pairs]


OTHERS = ("parameters the cockpit does not watch ({names}) moved between this step and the next (another optimizer "
          "trains them, or a param group added after watch()): the next step's loss is not on this step's update")


def shown(names: List[str]) -> str:
    """The first four names and how many more: how the reasons list parameters."""
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def reason(names: List[str]) -> str:
    return REASON.format(which=f" ({shown(names)})" if names else "")


SINCE_GRAD = ("the parameters{which} changed in place between the backward pass and optimizer.step() (e.g. a manual "
              "weight decay, or sharpness-aware minimization restoring w): the parameters at the step are not those "
              "the gradient was taken at (engine/param_versions.py)")


def since_grad_reason(names: List[str]) -> str:
    return SINCE_GRAD.format(which=f" ({shown(names)})" if names else "")
