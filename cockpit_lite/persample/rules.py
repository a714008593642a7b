"""Which per-layer rule computes the per-sample information of a module's own parameters."""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from .attention import attention_applies, attention_samples
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


class FallbackFailed(Unsupported):
    """The torch.func fallback could not trace the module (vmap): a per-sample replay of the model may still."""


@dataclass(frozen=True)
class Rule:
    """One layer type's per-sample rule: it ``applies(module, x)`` (x: the call's first input), and
    ``samples(module, x, grad, factor, call)`` gives {parameter attribute name: ParamSamples} from the
    output gradient ``grad`` times ``factor`` (most rules take delta = grad * factor; conv applies the
    factor where it is cheaper), or None where this call is not served after all (the fallback's then)."""

    name: str
    applies: Callable[[torch.nn.Module, Any], bool]
    samples: Callable[..., dict]


def _on_delta(rule):
    return lambda m, x, grad, factor, call: rule(m, x, grad * factor)


def _batch_norm(m, x, grad, factor, call):
    if batchnorm_mixes_samples(m, call.training):
        raise Unsupported("BatchNorm in training mode mixes samples")
    return batch_norm_eval_samples(m, x, grad * factor)


def _attention(m, x, grad, factor, call):
    reason = fallback_reason(m, call)  # attention dropout: no route replays it
    if reason:
        raise Unsupported(reason)
    return attention_samples(m, call, grad, factor)


def _tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


#: The layer rules, tried in this order (the first that applies serves the call), as BackPACK's module
#: extensions map module types to their derivatives. A module no rule serves goes to the torch.func
#: fallback (fallback.py), or is unsupported with the reason.
RULES: Tuple[Rule, ...] = (
    Rule("conv", lambda m, x: conv_supported(m) and _tensor(x) and x.dim() == m.weight.dim(),  # batched input
         lambda m, x, grad, factor, call: conv_samples(m, x, grad, factor)),
    Rule("linear", lambda m, x: isinstance(m, torch.nn.Linear) and _tensor(x), _on_delta(linear_samples)),
    Rule("embedding", lambda m, x: isinstance(m, torch.nn.Embedding) and _tensor(x) and not m.max_norm,
         _on_delta(embedding_samples)),
    Rule("layer_norm", lambda m, x: isinstance(m, torch.nn.LayerNorm), _on_delta(layer_norm_samples)),
    Rule("rms_norm", lambda m, x: _RMSNorm is not None and isinstance(m, _RMSNorm), _on_delta(rms_norm_samples)),
    Rule("group_norm", lambda m, x: isinstance(m, torch.nn.GroupNorm), _on_delta(group_norm_samples)),
    Rule("batch_norm", lambda m, x: isinstance(m, torch.nn.modules.batchnorm._BatchNorm), _batch_norm),
    Rule("attention", attention_applies, _attention),
)


def rule_for(module: torch.nn.Module, x) -> Optional[Rule]:
    """The rule that serves a call of ``module`` with first input ``x``, or None (the fallback's). A subclass
    that replaces ``forward`` (Hugging Face's learned position embeddings compute their indices from the
    attention mask or the input's shape; a Linear that scales its output) is not the layer the rule knows:
    the fallback differentiates its own forward, unless it is a norm whose forward gives the stock one's output
    (``same_as_stock``)."""
    if not stock_forward(module) and not same_as_stock(module, x):
        return None
    return next((r for r in RULES if r.applies(module, x)), None)


#: norms whose subclasses often re-route ``forward`` to the same functional (timm's GroupNorm1 and LayerNorm call
#: F.group_norm / F.layer_norm themselves, with a switch to a fused kernel)
_NORMS = tuple(c for c in (torch.nn.LayerNorm, torch.nn.GroupNorm, _RMSNorm) if c is not None)
_SAME_AS_STOCK: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def same_as_stock(module: torch.nn.Module, x) -> bool:
    """Whether ``module``, a subclass of a stock norm with its own ``forward``, gives the stock forward's output on
    ``x`` (to float32 rounding; checked on its first call, then remembered). Such a subclass is served by the stock
    rule: exact like the fallback, without its per-sample replay of the module, and with the terms the rounding check
    reads (PoolFormer's GroupNorm1 bias, whose gradient the pooling token mixer cancels to 0: the fallback's
    per-sample values were its rounding noise, logged as values). The first step's self-check compares the rule's
    sums with ``.grad`` as for any rule."""
    base = next((c for c in _NORMS if isinstance(module, c)), None)
    if base is None or not isinstance(x, torch.Tensor):
        return False
    verdict = _SAME_AS_STOCK.get(module)
    if verdict is None:
        try:
            with torch.no_grad():  # forward itself, not __call__: no hooks (the user's or a cockpit's) run
                own, stock = type(module).forward(module, x), base.forward(module, x)
            verdict = (isinstance(own, torch.Tensor) and own.shape == stock.shape and own.dtype == stock.dtype
                       and bool(torch.allclose(own, stock, rtol=1e-5, atol=1e-6)))
        except Exception:
            verdict = False
        _SAME_AS_STOCK[module] = verdict
    return verdict


def stock_forward(module: torch.nn.Module) -> bool:
    """Whether the module's ``forward`` is torch.nn's own (a subclass that keeps it counts)."""
    return getattr(type(module).forward, "__module__", "").startswith("torch.nn.")


def layer_samples(call, grad: torch.Tensor, b: int, factor: torch.Tensor):
    """{parameter attribute name: ParamSamples} for one captured call whose output gradient ``grad``
    times ``factor`` (0-d) is the per-sample loss gradient delta (``PerSampleView``)."""
    m = call.module
    x = call.inputs[0] if call.inputs else None
    if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag)) and m.scale_grad_by_freq:
        raise Unsupported(f"{type(m).__name__} ('{call.module_name}') has scale_grad_by_freq=True: its gradient "
                          "divides by each index's count over the whole batch, the samples mix (no per-sample "
                          "gradients add up to .grad)")
    if call.other_grad:
        # LSTMCell's (h, c), attention weights used, nn.LSTM's (output, (h_n, c_n)): the rules and the fallback read
        # the first tensor's gradient only, and a later one's hook gradient also holds what reaches the first through
        # the module itself (h = o * tanh(c)): neither sum is the sample's gradient (an LSTMCell loop: 36-47% off)
        raise FallbackFailed(f"{type(m).__name__} ('{call.module_name}') returns several tensors and more than the "
                             "first received a gradient, which no per-sample rule reads")
    rule = rule_for(m, x)
    if rule is not None:
        served = rule.samples(m, x, grad, factor, call)
        if served is not None:
            return served
    delta = grad * factor
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
        raise FallbackFailed(f"the torch.func per-sample fallback failed for {type(m).__name__} "
                          f"('{call.module_name}'): {type(err).__name__}: {err}") from None
