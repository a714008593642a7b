"""Weight normalisation re-evaluated with ops whose second derivatives are right.

``torch._weight_norm`` (used by ``torch.nn.utils.parametrizations.weight_norm`` and the old hook-based
``torch.nn.utils.weight_norm``) runs a fused kernel whose double backward is wrong in PyTorch (CPU, torch 2.14):
the dense "Hessian" of a weight-normalised MLP is 0.62 off its own transpose. The asymmetry check of the solvers
(``lanczos._check_symmetric``, ``hutchinson.check_symmetric``) only sees it where that layer dominates the
products: with one weight-normalised Linear among seven layers (tests/curvature/test_unseen_curvature_round6.py,
``layer_zoo_weight_norm``) hess_max_ev was logged 2.25849 "converged" with a bound of 1.4e-4 against a top
eigenvalue of 2.25813, and the products' trace was 0.29 against 0.78. The curvature's re-evaluation therefore
computes w = v * (g / ||v||) from ``norm_except_dim`` and elementwise ops, PyTorch's own unfused formula (the same
values), whose derivatives of every order are autograd's plain ones.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _UnfusedWeightNorm(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        return func(*args, **kwargs)


def uses_weight_norm(model: nn.Module) -> bool:
    """Whether a module of ``model`` is weight-normalised (parametrization or the old forward pre-hook)."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return any(isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values())
               for m in model.modules())


def unfused_weight_norm(active: bool):
    """A context in which ``torch._weight_norm`` is the unfused formula where ``active`` (``uses_weight_norm``; else
    nothing: a TorchFunctionMode sees every op)."""
    return _UnfusedWeightNorm() if active else nullcontext()
