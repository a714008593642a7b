"""What both framework integrations share: finding the loss module and the torch optimizer.

The loss is computed inside framework or model code, so the loss ``nn.Module`` is found by a
convention (an explicit ``loss_fn`` argument, else a ``loss_fn`` attribute of the model); the
frameworks wrap the torch optimizer (``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``).
``optimizer.step(closure)`` (Lightning) is handled by the cockpit itself (``Cockpit._on_step_pre``).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch

LOSS_ATTRIBUTE = "loss_fn"


def find_loss_module(loss_fn: Optional[torch.nn.Module], model: torch.nn.Module, where: str,
                     observed: Optional[torch.nn.Module] = None) -> Optional[torch.nn.Module]:
    """The loss ``nn.Module`` to observe: ``loss_fn`` if given, else ``model.loss_fn`` if that is an
    ``nn.Module``; ``None`` otherwise: silently when the ``observed`` model (default ``model``) is a
    Hugging Face model (``watch`` then observes the loss its forward computes, see ``hf_loss``), else
    with a warning saying what is lost and how to fix it."""
    if loss_fn is not None:
        if not isinstance(loss_fn, torch.nn.Module):
            raise TypeError(
                f"loss_fn must be the loss nn.Module that {where} calls (e.g. nn.CrossEntropyLoss()), "
                f"got {type(loss_fn).__name__}; a plain function cannot be observed")
        return loss_fn
    found = getattr(model, LOSS_ATTRIBUTE, None)
    if isinstance(found, torch.nn.Module):
        return found
    from .hf_loss import computes_loss_inside

    if computes_loss_inside(observed if observed is not None else model):
        return None
    warnings.warn(
        f"cockpit-lite: no loss module found: pass loss_fn=<the loss nn.Module {where} calls> or set "
        f"{type(model).__name__}.{LOSS_ATTRIBUTE} to it (an nn.Module such as nn.CrossEntropyLoss()). "
        "Without it 'loss' and the per-sample quantities (alpha, gradient tests, histograms, TIC) are "
        "unavailable and logged as NaN with that reason.",
        RuntimeWarning, stacklevel=3)
    return None


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside framework wrappers (Lightning's ``LightningOptimizer``, accelerate's
    ``AcceleratedOptimizer``: both keep it as ``.optimizer``)."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__.startswith(
            ("Lightning", "Accelerated")):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer or seen > 5:
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"cockpit-lite needs a torch.optim.Optimizer, found {type(optimizer).__name__}")
    return optimizer
