"""nn.MultiheadAttention: per-sample gradients of its projections, as Linear layers over the tokens.

Attention mixes the tokens of a sample, never two samples. Its input projections (q, k, v = x W^T + b)
and ``out_proj`` are Linear maps applied to every token, so with dP the gradient reaching the
projections' outputs and delta the one reaching the module's output:

* g_i(W_in) = sum_t dP_it x_it^T and g_i(b_in) = sum_t dP_it;
* g_i(W_out) = sum_t delta_it a_it^T and g_i(b_out) = sum_t delta_it, with a the heads' output.

Both are served by the Linear rule (``linear.py``: ghost norms, one GEMM per projection) instead of the
torch.func fallback's per-sample re-run of the whole module (``fallback.py``), which materializes every
per-sample gradient and costs several times more. x, dP, a and delta come from:

1. the step itself: ``attention_tap.py`` records the projections' inputs and output gradients during
   the tracked call (exact whatever the masks; also ``add_zero_attn``);
2. else a batched recomputation of the attention from the projections on, with one backward of the
   attention alone for dP. It follows ``F.multi_head_attention_forward`` for packed weights with one
   input (self-attention) or separate q/k/v weights (``kdim``/``vdim``), biases or not, a 2-D
   ``attn_mask`` (bool or additive), ``key_padding_mask``, ``is_causal`` with its mask, and its output
   is compared with the output the module produced in the step (``LayerCall.output``): a difference (a
   wrong ``is_causal`` hint, a change in torch) returns None.

Cross-attention with packed weights (a query distinct from key/value) splits W_in into row blocks that
see different inputs: served from the taps only, with W_in's per-sample gradients built per block and
stacked (materialized, as the fallback would). None sends the call to the fallback, as do
``bias_k``/``bias_v`` (parameters of their own), and 3-D masks and unbatched inputs when not tapped.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .linear import LinearWeightSamples, linear_samples
from .samples import DenseSamples, to_float

_KWARGS = frozenset({"key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"})


def attention_applies(module, x) -> bool:
    """Whether the rule may serve this module (the per-call checks come in ``attention_samples``)."""
    return (isinstance(module, torch.nn.MultiheadAttention) and isinstance(x, torch.Tensor) and x.dim() == 3
            and module.bias_k is None and module.bias_v is None)


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


def attention_samples(module, call, grad: torch.Tensor, factor: torch.Tensor) -> Optional[dict]:
    """{parameter name: ParamSamples} of one call (names as ``fallback.owned_parameters``), or None when
    this call is not served (the fallback's then). The per-sample loss gradient at the output is
    ``grad * factor``. From the projections tapped in the step where complete, else recomputed."""
    if module.bias_k is not None or module.bias_v is not None:  # parameters of their own: not served here
        return None
    served = _from_taps(module, call, factor)
    if served is not None:
        return served
    return _recomputed(module, call, grad * factor)


_IN = {True: ("in_proj_weight",), False: ("q_proj_weight", "k_proj_weight", "v_proj_weight")}


def _served(m, a: torch.Tensor, delta: torch.Tensor, inputs: Dict[str, list]) -> Optional[dict]:
    """{parameter name: ParamSamples} from out_proj's input ``a`` and output gradient ``delta`` ([B, T, E])
    and, per input projection weight in the order of ``_IN`` (that of in_proj_bias's rows), its
    [(x, dP, rows)] ([B, T, .]; rows None: the whole weight, else the row blocks of the packed weight
    that cross-attention projects with their own inputs, which must tile it)."""
    res = {f"out_proj.{k}": v for k, v in linear_samples(m.out_proj, a, delta).items()}
    grads = []  # dP per projection, in the order of in_proj_bias's rows
    for name, parts in inputs.items():
        parts = sorted(parts, key=lambda r: -1 if r[2] is None else r[2][0])
        grads += [dP for _, dP, _ in parts]
        if len(parts) == 1 and parts[0][2] is None:
            res[name] = LinearWeightSamples(parts[0][0], parts[0][1])
            continue
        edges = [r for _, _, r in parts]
        if None in edges or edges[0][0] != 0 or edges[-1][1] != m.in_proj_weight.shape[0] or any(
                e[1] != f[0] for e, f in zip(edges, edges[1:])):
            return None
        res[name] = DenseSamples(torch.cat([LinearWeightSamples(x, dP).materialize() for x, dP, _ in parts], dim=1))
    if m.in_proj_bias is not None:
        res["in_proj_bias"] = DenseSamples(torch.cat([g.sum(1) for g in grads], dim=1))
    return res


def _from_taps(m, call, factor: torch.Tensor) -> Optional[dict]:
    """From the step's own projections (``attention_tap.py``): inputs and output gradients of the input
    projections and of out_proj, inside the attention in its sequence-first layout ([T, B, .], out_proj's
    rows t-major: t * B + b)."""
    taps = getattr(call, "taps", None)
    args = call.inputs
    if not taps or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
        return None
    names = _IN[bool(m._qkv_same_embed_dim)] + ("out_proj.weight",)
    got: Dict[str, list] = {}
    for name, x, g, rows in taps:
        if g is None:
            return None  # no gradient reached it
        got.setdefault(name, []).append((x, g, rows))
    if set(got) != set(names) or any(len(got[n]) != 1 or got[n][0][2] is not None for n in names if n != "in_proj_weight"):
        return None  # another call pattern (e.g. a module called twice inside): recompute or fall back
    B = args[0].shape[0 if m.batch_first else 1]
    a, d_out, _ = got["out_proj.weight"][0]
    if a.dim() != 2 or a.shape[0] % B:
        return None
    T = a.shape[0] // B
    seq = lambda t: to_float(t).reshape(T, B, t.shape[-1]).transpose(0, 1)  # noqa: E731  [T*B, .] -> [B, T, .]
    fac = factor.to(to_float(d_out).dtype)
    inputs = {}
    for name in names[:-1]:
        if any(x.dim() != 3 or g.dim() != 3 or x.shape[1] != B for x, g, _ in got[name]):
            return None
        inputs[name] = [(to_float(x).transpose(0, 1), to_float(g).transpose(0, 1) * fac, rows) for x, g, rows in got[name]]
    return _served(m, seq(a), seq(d_out) * fac, inputs)


def _recomputed(module, call, delta: torch.Tensor) -> Optional[dict]:
    """Recompute the attention from the projections on, checked against the step's output."""
    if module.add_zero_attn:
        return None
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
    xs = (xq,) if packed else (xq, xk, xv)
    return _served(m, a.detach(), delta, {name: [(x, g, None)] for name, x, g in zip(_IN[bool(packed)], xs, grads)})
