"""Normalisation layers: the scale's per-sample gradient is sum over positions of delta * x_hat, the
shift's is sum of delta (x_hat = the normalised input, recomputed from the captured input). Both are
small ([b, C] or [b, *normalized_shape]), so they are held densely.

BatchNorm in training mode normalises with statistics of the whole batch: every sample's loss then
depends on every other sample, and per-sample gradients of BatchNorm and of all layers before it do
not exist in the sense of grad l_i; ``batchnorm_mixes_samples`` tells the view so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .samples import DenseSamples, to_float

BATCHNORM_REASON = ("BatchNorm in training mode mixes the samples of a batch (batch statistics), so "
                    "per-sample gradients of it and of every layer before it are not defined; put it in "
                    "eval mode or use GroupNorm/LayerNorm for per-sample quantities")


def batchnorm_mixes_samples(module, training: bool) -> bool:
    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return False
    return training or module.running_mean is None


def _affine(weight, bias, xhat, delta, sum_dims):
    out = {}
    if weight is not None:
        dx = delta * xhat
        out["weight"] = DenseSamples(dx.sum(sum_dims), terms=dx, dims=sum_dims) if sum_dims else DenseSamples(dx)
    if bias is not None:
        out["bias"] = DenseSamples(delta.sum(sum_dims), terms=delta, dims=sum_dims) if sum_dims else DenseSamples(delta)
    return out


def layer_norm_samples(module, x, delta):
    x, delta = to_float(x), to_float(delta)
    ns = tuple(module.normalized_shape)
    xhat = F.layer_norm(x, ns, None, None, module.eps)
    sum_dims = tuple(range(1, x.dim() - len(ns)))
    return _affine(module.weight, getattr(module, "bias", None), xhat, delta, sum_dims)


def rms_norm_samples(module, x, delta):
    x, delta = to_float(x), to_float(delta)
    ns = tuple(module.normalized_shape)
    xhat = F.rms_norm(x, ns, None, module.eps)
    sum_dims = tuple(range(1, x.dim() - len(ns)))
    return _affine(module.weight, None, xhat, delta, sum_dims)


def group_norm_samples(module, x, delta):
    x, delta = to_float(x), to_float(delta)
    xhat = F.group_norm(x, module.num_groups, None, None, module.eps)
    sum_dims = tuple(range(2, x.dim()))
    return _affine(module.weight, module.bias, xhat, delta, sum_dims)


def batch_norm_eval_samples(module, x, delta):
    """BatchNorm with running statistics (eval mode): a per-channel affine map of each sample."""
    x, delta = to_float(x), to_float(delta)
    shape = [1, -1] + [1] * (x.dim() - 2)
    xhat = (x - module.running_mean.reshape(shape)) * torch.rsqrt(module.running_var.reshape(shape) + module.eps)
    sum_dims = tuple(range(2, x.dim()))
    return _affine(module.weight, module.bias, xhat, delta, sum_dims)
