"""Generic per-sample gradients of one module's own parameters with torch.func.

Given the module's captured inputs x and the (scaled) gradient delta of its output, the per-sample
gradient of a parameter is grad_theta <module(x_i; theta), delta_i>, evaluated for all samples at
once with ``vmap(grad(...))`` over the module alone (its children run as they are). The result is
materialized ([b, *shape] per parameter of this module): one layer at a time.

Used for the nn.MultiheadAttention calls its own rule does not serve (``attention.py``: bias_k/bias_v,
calls whose projections were not recorded and cannot be recomputed), Conv3d and convolutions with string
padding, and any other module with direct parameters (with a one-time warning naming the module).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from ..param_slots import written_in_forward
from ..replay import replaying
from .samples import DenseSamples, to_float


def owned_parameters(module):
    """(name, parameter) pairs whose per-sample gradients a call of ``module`` provides.
    nn.MultiheadAttention uses out_proj's parameters without calling out_proj: they are its own. A parameter
    that a submodule also holds directly (RoBERTa's ``lm_head.bias`` is ``lm_head.decoder.bias``) is the
    submodule's: its call provides it, and counting the outer call too would count it twice."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return list(module.named_parameters(recurse=True))
    own = list(module.named_parameters(recurse=False))
    if not own or not module._modules:
        return own
    inner = {id(p) for sub in module.modules() if sub is not module for p in sub.parameters(recurse=False)}
    return [(n, p) for n, p in own if id(p) not in inner]


def batch_dim_of(module, x) -> int:
    if isinstance(module, torch.nn.MultiheadAttention) and not module.batch_first and x.dim() == 3:
        return 1
    return 0


def fallback_reason(module, call) -> str:
    """Why the fallback cannot be used for this call ('' when it can)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        if module.training and module.dropout > 0:
            return ("attention dropout draws a random mask that cannot be replayed per sample; "
                    "use dropout=0 in nn.MultiheadAttention for per-sample quantities")
        mask = call.kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 3:
            return "a per-sample 3-d attn_mask is not supported"
    elif any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules()) and module.training:
        return f"{type(module).__name__} contains dropout, which cannot be replayed per sample"
    elif isinstance(module, torch.nn.EmbeddingBag):
        x = call.inputs[0] if call.inputs else None
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            return (f"EmbeddingBag ('{call.module_name}') is called on a 1-D index list with offsets: its bags are "
                    "packed along one dimension, which no per-sample rule splits; pass a 2-D [B, L] input "
                    "(per_sample_weights of the same shape) for per-sample values")
    return ""


def _per_row(v, b: int) -> bool:
    """A keyword value with the batch along dim 0: a tensor, or a tuple / list of them (LSTMCell's (h, c))."""
    if isinstance(v, (tuple, list)):
        return bool(v) and all(_per_row(t, b) for t in v)
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b


def fallback_samples(module, call, delta: torch.Tensor, b: int):
    """{parameter name: DenseSamples} for the module's direct parameters."""
    inputs, kw = tuple(call.inputs), dict(call.kwargs)
    cell = isinstance(module, torch.nn.RNNCellBase)
    if cell and len(inputs) > 1:  # cell(x, hx): the state as the keyword, split below like one
        inputs, kw = inputs[:1], {**kw, "hx": inputs[1]}
    # the tensors inside tuple / list / dict arguments are arguments too (a model taking a dict: a root module
    # owning a bare parameter); was: theirs unbatched, or StopIteration with none
    args, spec = tree_flatten(inputs)
    first = next(a for a in args if isinstance(a, torch.Tensor))
    bdim = batch_dim_of(module, first)
    own = dict(owned_parameters(module))
    names = list(own)
    batched_args = [isinstance(a, torch.Tensor) and a.dim() > bdim and a.shape[bdim] == b for a in args]
    # keywords with the batch along dim 0 are per sample too (position_ids of a learned position embedding);
    # attention's masks other than key_padding_mask are [T, S] (T may equal b): not batched
    mha = isinstance(module, torch.nn.MultiheadAttention)
    kw_batched = {k for k, v in kw.items() if (k == "key_padding_mask" or not mha) and _per_row(v, b)}
    kw_b = {k: kw[k] for k in kw_batched}
    kw_fixed = {k: v for k, v in kw.items() if k not in kw_batched}
    if isinstance(module, torch.nn.MultiheadAttention):
        kw_fixed["need_weights"] = False
    if isinstance(module, (torch.nn.GRU, torch.nn.RNN)) and len(args) == 1 and "hx" not in kw:
        # their own zero initial state is not batched by vmap: give it, one per sample
        layers = module.num_layers * (2 if module.bidirectional else 1)
        kw_b["hx"] = torch.zeros(b, layers, module.hidden_size, dtype=first.dtype, device=first.device)
    if cell and kw.get("hx") is None:  # likewise a cell's (GRUCell(x) on the first time step; was NaN)
        zero = torch.zeros(b, module.hidden_size, dtype=first.dtype, device=first.device)
        kw_b["hx"] = (zero, zero.clone()) if isinstance(module, torch.nn.LSTMCell) else zero
        kw_fixed.pop("hx", None)
    state_dim = 1 if isinstance(module, (torch.nn.GRU, torch.nn.RNN)) else 0  # hx [layers, B, H] / a cell's [B, H]
    delta = to_float(delta)

    def inner(params, args_b, kw_b1, delta_i):
        it = iter(args_b)
        full = [next(it).unsqueeze(bdim) if flag else a for flag, a in zip(batched_args, args)]
        kwargs = dict(kw_fixed)
        kwargs.update({k: tree_map(lambda t, d=state_dim if k == "hx" else 0: t.unsqueeze(d), v)
                       for k, v in kw_b1.items()})
        with replaying():  # a watched model's own hooks must not take this for a training forward
            out = functional_call(module, params, tree_unflatten(full, spec), kwargs,
                                  tie_weights=False)  # (param_slots.py)
        out = next(leaf for leaf in tree_leaves(out) if isinstance(leaf, torch.Tensor))
        return (to_float(out) * delta_i.unsqueeze(bdim)).sum()

    copied = written_in_forward(module)  # Embedding(max_norm) renormalises in place: a copy (param_slots.py)
    params = {n: own[n].detach().clone() if id(own[n]) in copied else own[n].detach() for n in names}
    args_b = [a for flag, a in zip(batched_args, args) if flag]
    # the math attention kernel decomposes into ops that vmap batches (the fused CPU kernel has no rule)
    # outer no_grad: the module's other parameters (a root module owning a bare table) would otherwise link the
    # per-sample gradients to autograd's graph (torch.func.grad differentiates inside regardless)
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        grads = vmap(grad(inner), in_dims=(None, [bdim] * len(args_b), {k: 0 for k in kw_b}, bdim))(
            params, args_b, kw_b, delta)
    return {n: DenseSamples(to_float(grads[n]).detach()) for n in names}
