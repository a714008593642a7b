"""Ops the curvature's re-evaluation replaces by plain equivalents: the same values, derivatives of every order
autograd's own, and dense.

* ``torch._weight_norm`` (``torch.nn.utils.parametrizations.weight_norm`` and the old hook-based
  ``torch.nn.utils.weight_norm``) runs a fused kernel whose double backward is wrong in PyTorch (CPU, torch 2.14):
  the dense "Hessian" of a weight-normalised MLP is 0.62 off its own transpose. The solvers' asymmetry check
  (``lanczos._check_symmetric``, ``hutchinson.check_symmetric``) sees it only where that layer dominates the
  products: with one weight-normalised Linear among seven layers (``layer_zoo_weight_norm``,
  tests/curvature/test_unseen_curvature_round6.py) hess_max_ev was logged 2.25849 "converged", bound 1.4e-4, against
  a top eigenvalue of 2.25813, and the products' trace was 0.29 against 0.78. Here w = v * (g / ||v||) is computed
  from ``norm_except_dim`` and elementwise ops: PyTorch's own unfused formula.
* ``F.embedding`` with ``scale_grad_by_freq=True`` divides each row's gradient by its count in the batch: not
  the gradient of the loss, so its derivative is not the loss's Hessian (the products were asymmetric: NaN on some
  steps and an unchecked value on others). With ``sparse=True`` the products are sparse tensors that the solvers
  cannot flatten (hess_max_ev failed with "reshape is not implemented for sparse tensors"). Both flags only change
  the gradient's form, never the loss: the re-evaluation looks the rows up without them.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode


class _PlainOps(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch._weight_norm:
            v, g, *rest = args
            dim = rest[0] if rest else kwargs.get("dim", 0)
            return v * (g / torch.norm_except_dim(v, 2, dim))
        if func is F.embedding:  # (input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)
            return func(*args[:5], **{**kwargs, "scale_grad_by_freq": False, "sparse": False})
        return func(*args, **kwargs)


def needs_plain_ops(model: nn.Module) -> bool:
    """Whether ``model`` holds a weight-normalised module (parametrization or the old forward pre-hook) or an
    Embedding with ``scale_grad_by_freq`` or ``sparse``."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        if isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
        if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse):
            return True
    return False


def plain_ops(active: bool):
    """A context in which those ops are replaced, where ``active`` (``needs_plain_ops``; else nothing: a
    TorchFunctionMode sees every op)."""
    return _PlainOps() if active else nullcontext()
