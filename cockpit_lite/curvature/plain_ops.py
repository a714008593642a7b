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
* ``F.embedding_bag`` (``nn.EmbeddingBag``): PyTorch has no derivative of its backward (every curvature value was
  NaN): F.embedding and a sum / mean / max over each bag instead.
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
        if func is F.embedding_bag:
            return _embedding_bag(*args, **kwargs)
        return func(*args, **kwargs)


def _embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False, mode="mean",
                   sparse=False, per_sample_weights=None, include_last_offset=False, padding_idx=None):
    """F.embedding_bag from F.embedding and a segment reduction (same values): PyTorch has no derivative of
    ``_embedding_bag_backward``, so the products through the fused op failed (every curvature value NaN)."""
    if input.dim() == 2:  # [B, L]: one bag per row
        b, n = input.shape
        flat = input.reshape(-1)
        bag = torch.arange(b, device=input.device).repeat_interleave(n)
        per_sample_weights = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    else:
        flat, b = input, offsets.numel() - (1 if include_last_offset else 0)
        ends = torch.cat([offsets[1:b], offsets.new_tensor([flat.numel()])])
        bag = torch.repeat_interleave(torch.arange(b, device=input.device), ends - offsets[:b])
    rows = F.embedding(flat, weight, None, max_norm, norm_type)
    keep = torch.ones_like(flat, dtype=torch.bool) if padding_idx is None else flat != padding_idx
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.unsqueeze(1)
    out = rows.new_zeros(b, weight.shape[1])
    if mode == "max":
        idx = bag[keep].unsqueeze(1).expand(-1, weight.shape[1])
        return out.scatter_reduce(0, idx, rows[keep], "amax", include_self=False)
    out = out.index_add(0, bag[keep], rows[keep])
    if mode == "mean":
        count = torch.zeros(b, dtype=rows.dtype, device=rows.device).index_add(0, bag, keep.to(rows.dtype))
        out = out / count.clamp(min=1).unsqueeze(1)
    return out


def needs_plain_ops(model: nn.Module) -> bool:
    """Whether ``model`` holds a weight-normalised module (parametrization or the old forward pre-hook), an
    Embedding with ``scale_grad_by_freq`` or ``sparse``, or an EmbeddingBag."""
    from torch.nn.utils.parametrizations import _WeightNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for m in model.modules():
        if isinstance(m, _WeightNorm) or any(isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            return True
        if isinstance(m, nn.Embedding) and (m.scale_grad_by_freq or m.sparse) or isinstance(m, nn.EmbeddingBag):
            return True
    return False


def plain_ops(active: bool):
    """A context in which those ops are replaced, where ``active`` (``needs_plain_ops``; else nothing: a
    TorchFunctionMode sees every op)."""
    return _PlainOps() if active else nullcontext()
