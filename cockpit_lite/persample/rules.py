"""Which per-layer rule computes the per-sample information of a module's own parameters."""

from __future__ import annotations

import warnings

import torch

from .conv import conv_samples, conv_supported
from .embedding import embedding_samples
from .fallback import fallback_reason, fallback_samples
from .linear import linear_samples
from .norm import (batch_norm_eval_samples, batchnorm_mixes_samples, group_norm_samples, layer_norm_samples,
                   rms_norm_samples)

_WARNED: set = set()
_RMSNorm = getattr(torch.nn, "RMSNorm", None)


class Unsupported(Exception):
    """The per-sample information of this call's parameters is not available (message = reason)."""


def layer_samples(call, grad: torch.Tensor, b: int, factor: torch.Tensor):
    """{parameter attribute name: ParamSamples} for one captured call whose output gradient ``grad``
    times ``factor`` (0-d) is the per-sample loss gradient delta (``PerSampleView``)."""
    m = call.module
    x = call.inputs[0] if call.inputs else None
    if conv_supported(m) and isinstance(x, torch.Tensor) and x.dim() == m.weight.dim():  # batched input
        return conv_samples(m, x, grad, factor)  # applies the factor where it is cheaper
    delta = grad * factor
    if isinstance(m, torch.nn.Linear) and isinstance(x, torch.Tensor):
        return linear_samples(m, x, delta)
    if isinstance(m, torch.nn.Embedding) and isinstance(x, torch.Tensor) and not m.max_norm:
        return embedding_samples(m, x, delta)
    if isinstance(m, torch.nn.LayerNorm):
        return layer_norm_samples(m, x, delta)
    if _RMSNorm is not None and isinstance(m, _RMSNorm):
        return rms_norm_samples(m, x, delta)
    if isinstance(m, torch.nn.GroupNorm):
        return group_norm_samples(m, x, delta)
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        if batchnorm_mixes_samples(m, call.training):
            raise Unsupported("BatchNorm in training mode mixes samples")
        return batch_norm_eval_samples(m, x, delta)
    reason = fallback_reason(m, call)
    if reason:
        raise Unsupported(reason)
    if not isinstance(m, torch.nn.MultiheadAttention):
        key = (type(m).__name__, call.module_name)
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"cockpit-lite: no per-sample rule for {type(m).__name__} ('{call.module_name}'); "
                          "using the generic torch.func fallback (slower, materializes its per-sample gradients)",
                          RuntimeWarning, stacklevel=2)
    try:
        return fallback_samples(m, call, delta, b)
    except Exception as err:  # vmap cannot trace every module
        raise Unsupported(f"the torch.func per-sample fallback failed for {type(m).__name__} "
                          f"('{call.module_name}'): {type(err).__name__}: {err}") from None
