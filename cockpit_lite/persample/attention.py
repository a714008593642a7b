"""nn.MultiheadAttention: per-sample gradients of its projections from one batched recomputation.

Attention mixes the tokens of a sample, never two samples. So the gradient that reaches the input
projections (q, k, v = x W^T + b, every token of every sample) comes from one batched backward of the
attention alone, from the projections to the module's output, given the output gradient delta:

* g_i(W_in) = sum_t dP_it x_it^T and g_i(b_in) = sum_t dP_it, with dP = d<out, delta>/d(q, k, v);
* g_i(W_out) = sum_t delta_it a_it^T and g_i(b_out) = sum_t delta_it, with a the heads' output.

Both weights are then Linear layers over the tokens (``linear.py``: ghost norms, one GEMM per projection),
instead of the torch.func fallback's per-sample re-run of the whole module (``fallback.py``), which
materializes every per-sample gradient and costs several times more.

The recomputation follows ``F.multi_head_attention_forward`` for the configurations served here: packed
weights with one input (self-attention) or separate q/k/v weights (``kdim``/``vdim``), biases or not,
a 2-D ``attn_mask`` (bool or additive), ``key_padding_mask``, ``is_causal`` with its mask. Its output is
compared with the output the module produced in the step (``LayerCall.output``); a difference (another
configuration, a wrong ``is_causal`` hint, a change in torch) returns None and the call goes to the
fallback, as do the configurations not served: ``bias_k``/``bias_v``, ``add_zero_attn``, 3-D masks,
unbatched inputs, packed weights with distinct query and key/value (cross-attention).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .linear import linear_samples
from .samples import DenseSamples, to_float

_KWARGS = frozenset({"key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"})


def attention_applies(module, x) -> bool:
    """Whether the rule may serve this module (the per-call checks come in ``attention_samples``)."""
    return (isinstance(module, torch.nn.MultiheadAttention) and isinstance(x, torch.Tensor) and x.dim() == 3
            and module.bias_k is None and module.bias_v is None and not module.add_zero_attn)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same view of the same storage (the capture detaches each input on its own)."""
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.data_ptr() == b.data_ptr())


def _additive(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    """A mask as F.multi_head_attention_forward uses it: bool True = not attended (-inf), float added."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _tolerance(dtype) -> float:
    """Relative difference accepted between the recomputed and the step's output."""
    return {torch.float64: 1e-10, torch.float32: 1e-4}.get(dtype, 5e-2)


def attention_samples(module, call, delta: torch.Tensor) -> Optional[dict]:
    """{parameter name: ParamSamples} of one call (names as ``fallback.owned_parameters``), or None when
    this call is not served (the fallback's then). ``delta``: the scaled output gradient."""
    args, kw = call.inputs, call.kwargs
    out_ref = getattr(call, "output", None)
    if (len(args) != 3 or not all(isinstance(a, torch.Tensor) and a.dim() == 3 for a in args)
            or set(kw) - _KWARGS or out_ref is None):
        return None
    attn_mask, kpm = kw.get("attn_mask"), kw.get("key_padding_mask")
    if attn_mask is not None and attn_mask.dim() != 2:
        return None
    if kw.get("is_causal") and attn_mask is None:
        return None
    m = module
    packed = m._qkv_same_embed_dim
    if packed and not (_same_tensor(args[0], args[1]) and _same_tensor(args[1], args[2])):
        return None
    bf = (lambda t: t) if m.batch_first else (lambda t: t.transpose(0, 1))
    xq, xk, xv = (to_float(bf(a)) for a in args)
    dtype = xq.dtype
    delta = to_float(bf(delta)).to(dtype)
    B, T, E = xq.shape
    S, H = xk.shape[1], m.num_heads
    dh = E // H
    w = lambda p: None if p is None else p.detach().to(dtype)  # noqa: E731
    with torch.enable_grad():
        if packed:
            P = F.linear(xq, w(m.in_proj_weight), w(m.in_proj_bias)).detach().requires_grad_()
            leaves = [P]
            q, k, v = P.chunk(3, dim=-1)
        else:
            bq = bk = bv = None
            if m.in_proj_bias is not None:
                bq, bk, bv = w(m.in_proj_bias).chunk(3)
            leaves = [F.linear(x, w(p), b).detach().requires_grad_()
                      for x, p, b in ((xq, m.q_proj_weight, bq), (xk, m.k_proj_weight, bk), (xv, m.v_proj_weight, bv))]
            q, k, v = leaves
        heads = lambda t, n: t.reshape(B, n, H, dh).transpose(1, 2)  # noqa: E731
        mask = _additive(attn_mask, dtype)
        if kpm is not None:
            kp = _additive(kpm, dtype).reshape(B, 1, 1, S)
            mask = kp if mask is None else mask + kp
        a = F.scaled_dot_product_attention(heads(q, T), heads(k, S), heads(v, S), attn_mask=mask)
        a = a.transpose(1, 2).reshape(B, T, E)
        Wo, bo = w(m.out_proj.weight), w(m.out_proj.bias)
        with torch.no_grad():
            ref = to_float(bf(out_ref)).to(dtype)
            err = float((F.linear(a, Wo, bo) - ref).abs().max())
            scale = float(ref.abs().max())
        if not err <= _tolerance(out_ref.dtype) * max(scale, 1e-30):  # NaN fails too
            return None
        grads = torch.autograd.grad(a, leaves, delta @ Wo)
    a = a.detach()
    res = {f"out_proj.{k}": v for k, v in linear_samples(m.out_proj, a, delta).items()}
    if packed:
        lin = linear_samples(m.out_proj, xq, grads[0])  # a Linear E -> 3E over the tokens
        res["in_proj_weight"] = lin["weight"]
        if m.in_proj_bias is not None:
            res["in_proj_bias"] = DenseSamples(grads[0].sum(1))
    else:
        for name, x, g in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), (xq, xk, xv), grads):
            res[name] = linear_samples(m.out_proj, x, g)["weight"]
        if m.in_proj_bias is not None:
            res["in_proj_bias"] = DenseSamples(torch.cat([g.sum(1) for g in grads], dim=1))
    return res
