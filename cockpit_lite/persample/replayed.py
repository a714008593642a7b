"""Per-sample gradients of the parameters no layer rule can give, by replaying the model per sample.

The layer rules read a module call's dim 0 as the batch. Parameters outside that picture:

* a module called without the batch dimension whose output is broadcast over it (a learned position
  embedding on ``arange(T)`` or ``position_ids`` of shape (1, T), a learned table added to a batch);
* a bare ``nn.Parameter`` used in ``forward`` outside any submodule (on the root module);
* a parameter also used outside its module (a weight tied through ``F.linear(h, emb.weight)``), which
  the self-check finds (``selfcheck.py``).

For these, g_i = grad l_i is computed directly: ``torch.func.vmap(grad(l))`` over the step's captured
model inputs, one sample at a time (each sample's inputs with a batch dimension of 1), with
``functional_call`` on the model and the loss read through the same view of the output as in training
(``output_view.py``), l_i scaled as ``losses.py`` defines it. Only the wanted parameters are differentiated.
Cost: about one extra forward and backward of the micro-batch (vectorised), plus [b, *shape] per wanted
parameter.

The replay is trusted only where it reproduces the step: it must give back the per-sample losses of the
training step (within 1e-3), which fails when the model mixes samples (BatchNorm in training mode) or
computes something else; a model that draws random numbers in ``forward`` (dropout) cannot be replayed
per sample and is refused (vmap ``randomness="error"``). Any refusal is a reason naming the cause.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Optional, Tuple

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from ..forward_buffers import start_values
from ..param_slots import aliases, written_in_forward
from ..replay import replaying
from ..rng import preserved_rng, set_rng_state
from .losses import LossUnavailable, elementwise_loss, mean_factor, none_copy
from .norm import batchnorm_mixes_samples
from .output_view import ViewUnavailable, replay as replay_view, row_sample_ids


class ReplayUnavailable(Exception):
    """The per-sample replay cannot give these parameters' per-sample gradients (message = reason)."""


def replayed_grads(model: torch.nn.Module, loss_fn, call, mb, b: int, reduction: str,
                   wanted: Dict[int, torch.Tensor], trained_losses: Optional[torch.Tensor],
                   dim: int = 0) -> Dict[int, torch.Tensor]:
    """{index: [b, *shape] per-sample gradients} of the ``wanted`` parameters ({index: parameter}) in the
    micro-batch whose model call is ``call`` (``ModelCall``) and loss call ``mb`` (``MicroBatch``)."""
    if not isinstance(loss_fn, torch.nn.Module) or not hasattr(loss_fn, "reduction"):
        raise ReplayUnavailable("the loss function is not an nn.Module with a 'reduction' attribute")
    if mb.output is None or mb.target is None:
        raise ReplayUnavailable("the loss inputs of this step were not kept")
    if getattr(mb, "replay", None):
        raise ReplayUnavailable(mb.replay)
    view, out_key = getattr(mb, "view", None), None
    if getattr(loss_fn, "output_key", None) is not None:  # a model computing its loss in forward (ModelLoss)
        out_key, view = loss_fn.output_key
    if view is None:
        raise ReplayUnavailable("the loss input is neither the model output nor read from it by a view or a copy, "
                                "so the loss of one sample cannot be re-evaluated from the model alone")
    mixing = [n for n, m in model.named_modules() if batchnorm_mixes_samples(m, m.training)]
    if mixing:
        raise ReplayUnavailable(f"BatchNorm in training mode ('{mixing[0]}') mixes the samples of the batch")
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [j for j, p in wanted.items() if id(p) not in names]
    if missing:
        raise ReplayUnavailable("the parameter is not a parameter of the watched model")
    # every (module, attribute) slot, for functional_call(tie_weights=False): the default left a layer registered
    # twice holding the replay's tensor afterwards (param_slots.py); tied weights are given under each name
    slots = aliases(model, "_parameters")
    keys = {j: slots[id(p)] for j, p in wanted.items()}
    copied = written_in_forward(model)

    def own(p):  # a parameter forward writes in place: a copy (param_slots.written_in_forward)
        return p.detach().clone() if id(p) in copied else p.detach()

    state = {}
    for p in {id(p): p for p in model.parameters()}.values():
        t = own(p)
        state.update({k: t for k in slots[id(p)]})
    # each buffer as the step's forward found it (forward_buffers.py: spectral_norm's u, v not advanced twice)
    starts = start_values({id(b): b for b in model.buffers()}.values(), getattr(call, "buffers", None) or {})
    for key, buf in starts.items():
        clone = buf.clone()
        state.update({k: clone for k in aliases(model, "_buffers").get(key, ())})

    # the tensors inside a dict / list / tuple argument too (model({"idx": x, "lengths": n}))
    arg_leaves, arg_spec = tree_flatten(tuple(call.args))
    args_b, args_fixed, arg_flags = _split_batched(tuple(arg_leaves), b, dim)
    kw_leaves, kw_spec = tree_flatten(dict(call.kwargs))
    kw_b, kw_fixed, kw_flags = _split_batched(tuple(kw_leaves), b, dim)
    targets = _per_sample_targets(tuple(mb.target), view, b, dim)
    try:
        factor = mean_factor(elementwise_loss(loss_fn, mb.output, tuple(mb.target)), b, reduction, float(mb.loss))
    except LossUnavailable as err:
        raise ReplayUnavailable(str(err)) from None
    fn = none_copy(loss_fn)

    def one_sample(theta, a_b, k_b, t_b):
        st = dict(state)
        st.update({k: t for j, t in theta.items() for k in keys[j]})
        args = tree_unflatten(_merge(a_b, args_fixed, arg_flags, dim), arg_spec)
        kwargs = tree_unflatten(_merge(k_b, kw_fixed, kw_flags, dim), kw_spec)
        with replaying():
            out = functional_call(model, st, tuple(args), kwargs, tie_weights=False)
        if out_key is not None:  # a model computing its loss in forward: the entry its loss read (out.logits)
            leaf = out[out_key]
        else:
            leaf = out if isinstance(out, torch.Tensor) else next(x for x in tree_leaves(out) if isinstance(x, torch.Tensor))
        L = replay_view(view, leaf.movedim(dim, 0) if dim else leaf, (b, 1))
        elems = fn(L, *(t.unsqueeze(0) if flag == 1 else t for t, flag in t_b))
        loss = elems.float().sum() * factor if elems.dtype in (torch.float16, torch.bfloat16) else elems.sum() * factor
        return loss, loss.detach()

    theta = {j: own(p) for j, p in wanted.items()}
    t_vals = [t for t, _ in targets]
    t_dims = [0 if flag else None for _, flag in targets]
    f = lambda th, a, k, tv: one_sample(th, a, k, [(x, flag) for x, (_, flag) in zip(tv, targets)])
    try:
        with preserved_rng(), _attention_math(), _autocast(getattr(call, "autocast", None)):
            set_rng_state(call.rng_state)
            grads, losses = vmap(grad_and_value(f, has_aux=True), in_dims=(None, dim, dim, t_dims),
                                 randomness="error")(theta, args_b, kw_b, t_vals)
    except ViewUnavailable as err:
        raise ReplayUnavailable(str(err)) from None
    except Exception as err:
        if isinstance(err, RuntimeError) and "random" in str(err):
            raise ReplayUnavailable("the model draws random numbers in forward (dropout?), which a per-sample "
                                    "replay cannot reproduce; use dropout=0 for per-sample quantities") from None
        # modules vmap cannot batch (nn.GRU/nn.RNN creating their initial state): one sample at a time
        try:
            with preserved_rng(), _attention_math(), _autocast(getattr(call, "autocast", None)):
                set_rng_state(call.rng_state)
                grads, losses = _loop(one_sample, theta, args_b, kw_b, targets, b, dim)
        except ViewUnavailable as err2:
            raise ReplayUnavailable(str(err2)) from None
        except Exception as err2:
            raise ReplayUnavailable(f"the per-sample replay failed: {type(err).__name__}: {err}; one sample at a "
                                    f"time: {type(err2).__name__}: {err2}") from None
    losses = losses[1] if isinstance(losses, tuple) else losses
    if trained_losses is None or not bool(torch.isfinite(trained_losses).all()):
        raise ReplayUnavailable("the step's per-sample losses are unavailable, so the replay cannot be verified")
    again, ref = losses.detach().double().reshape(-1), trained_losses.detach().double().reshape(-1)
    tol = 1e-3 * float(ref.abs().max()) + 1e-12
    if again.shape != ref.shape or bool(((again - ref).abs() > tol).any()):
        raise ReplayUnavailable("replaying the model one sample at a time does not reproduce the step's per-sample "
                                "losses (the forward mixes samples or is not replayable)")
    return {j: g.detach().float() if g.dtype in (torch.float16, torch.bfloat16) else g.detach()
            for j, g in grads.items()}


def _loop(one_sample, theta, args_b, kw_b, targets, b: int, dim: int = 0):
    """The per-sample gradients by a loop of autograd over single samples (vmap's fallback)."""
    keys = list(theta)
    grads = {j: [] for j in keys}
    losses = []
    for i in range(b):
        th = {j: theta[j].detach().requires_grad_(True) for j in keys}
        t_i = [(t[i] if flag else t, flag) for t, flag in targets]
        with torch.enable_grad():
            loss, _ = one_sample(th, [a.select(dim, i) for a in args_b], [k.select(dim, i) for k in kw_b], t_i)
            got = torch.autograd.grad(loss, [th[j] for j in keys], allow_unused=True)
        for j, g in zip(keys, got):
            grads[j].append(torch.zeros_like(theta[j]) if g is None else g.detach())
        losses.append(loss.detach())
    return {j: torch.stack(v) for j, v in grads.items()}, torch.stack(losses)


def _split_batched(values: Tuple, b: int, dim: int = 0):
    """(batched tensors, the others, flags): tensors with b entries along ``dim`` are split per sample."""
    flags = [isinstance(v, torch.Tensor) and v.dim() > dim and v.shape[dim] == b for v in values]
    return ([v for v, f in zip(values, flags) if f], [v for v, f in zip(values, flags) if not f], flags)


def _merge(batched, fixed, flags, dim: int = 0) -> List:
    it_b, it_f = iter(batched), iter(fixed)
    return [next(it_b).unsqueeze(dim) if f else next(it_f) for f in flags]


def _per_sample_targets(target: Tuple, view, b: int, dim: int = 0):
    """[(tensor, how)]: a target with b rows is split by rows; one whose rows follow a batch-major
    flattening of the output (``logits.view(-1, V)``, ``y.view(-1)``) is split into b blocks."""
    out = []
    for t in target:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            out.append((t, 0))
        elif t.shape[0] == b and dim == 0:
            out.append((t, 1))
        elif dim and view.size and t.shape[0] == view.size[0] and view.kind != "copy":
            # rows of a flattened sequence-first output: each row's sample from the view's positions
            rows = row_sample_ids(view, dim).to(t.device) if len(view.out_shape) > dim else None
            if rows is None or bool((torch.bincount(rows, minlength=b) != rows.numel() // b).any()):
                raise ReplayUnavailable(f"the model output {tuple(view.out_shape)} does not have the batch of the "
                                        f"sequence-first inputs ({b}) along dim {dim} (e.g. pooled over time into "
                                        "[B, classes]): the per-sample replay along dim 1 cannot split its loss")
            out.append((torch.stack([t[rows == i] for i in range(b)]), 2))
        elif (view.kind in ("reshape", "identity", "cast") and view.size and t.shape[0] == view.size[0]
              and t.shape[0] % b == 0):
            out.append((t.reshape(b, t.shape[0] // b, *t.shape[1:]), 2))
        else:
            raise ReplayUnavailable(f"the loss target of shape {tuple(t.shape)} cannot be split into the batch's "
                                    f"{b} samples")
    return out  # flag 0: the same for every sample; 1: split by rows (re-batched); 2: split into blocks


def _attention_math():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover
        return nullcontext()


def _autocast(amp):
    if amp is None:
        return nullcontext()
    device, dtype = amp
    return torch.autocast(device, dtype=dtype)
