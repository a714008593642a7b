"""The losses Hugging Face models compute inside ``forward``, in the form the cockpit re-evaluates.

A model computes its loss either with ``self.loss_function(...)`` (a function of
``transformers.loss.loss_utils``: ``ForCausalLMLoss``, ``ForMaskedLMLoss``, ...) or with a loss module
made on the spot (``CrossEntropyLoss()(logits.view(-1, C), labels.view(-1))`` in BERT's heads). A
:class:`LossForm` describes one such call as ``(model output, *target)``, the way the cockpit keeps a
loss call, and gives back

* ``reduced(output, *target)``: the loss exactly as the model computes it (the same function or module);
* ``elementwise(output, *target)``: the unreduced losses, one row per sample (``[B, ...]``), from which
  the per-sample losses are formed (``cockpit_lite/persample/losses.py``: a mean's normaliser, e.g.
  ``num_items_in_batch`` or the tokens left after ``ignore_index``, is recovered from the logged loss).

Only forms known here have per-sample losses; any other loss function is still observed (its value is
the logged ``loss``) and its per-sample quantities are NaN with a reason naming the function.
"""

from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F


class Keywords(dict):
    """Keyword arguments of a loss call that have no position; kept as the last target element."""


@dataclass
class LossForm:
    name: str
    reduced: Callable[..., torch.Tensor]
    elementwise: Optional[Callable[..., torch.Tensor]] = None
    unavailable: str = ""  # why there is no elementwise form
    order: Tuple[str, ...] = field(default=())  # parameter names of (output, *target) for a function


def _split_keywords(target: tuple) -> Tuple[tuple, Dict[str, Any]]:
    if target and isinstance(target[-1], Keywords):
        return target[:-1], dict(target[-1])
    return target, {}


# -- loss modules made inside forward (BERT's heads) ------------------------------------------------
def module_form(module: torch.nn.Module) -> LossForm:
    """The form of a loss module called as ``module(output, *target)``."""
    base = copy.copy(module)  # without the hooks of the original: re-evaluations are not training calls
    base._forward_hooks = type(base._forward_hooks)()
    base._forward_pre_hooks = type(base._forward_pre_hooks)()

    def reduced(output, *target):
        return base.forward(output, *target)

    if not hasattr(base, "reduction"):
        return LossForm(type(module).__name__, reduced, unavailable=f"{type(module).__name__} has no reduction")
    flat = copy.copy(base)
    flat.reduction = "none"

    def elementwise(output, *target):
        return flat.forward(output, *target)

    return LossForm(type(module).__name__, reduced, elementwise)


def module_positional(args: tuple, kwargs: dict) -> tuple:
    return tuple(args) + (tuple(kwargs.values()) if kwargs else ())


# -- self.loss_function(...) ----------------------------------------------------------------------
def _causal_lm(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_):
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    b = logits.shape[0]
    out = F.cross_entropy(logits.float().reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device),
                          ignore_index=ignore_index, reduction="none")
    return out.reshape(b, -1)


def _masked_lm(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, **_):
    b = logits.shape[0]
    out = F.cross_entropy(logits.float().reshape(-1, vocab_size), labels.reshape(-1).to(logits.device),
                          ignore_index=ignore_index, reduction="none")
    return out.reshape(b, -1)


def _token_classification(logits, labels, config, **_):
    b = logits.shape[0]
    out = F.cross_entropy(logits.float().reshape(-1, config.num_labels), labels.reshape(-1).to(logits.device),
                          reduction="none")
    return out.reshape(b, -1)


def _sequence_classification(labels, pooled_logits, config, **_):
    labels = labels.to(pooled_logits.device)
    problem = config.problem_type
    if problem == "regression":
        if config.num_labels == 1:
            return F.mse_loss(pooled_logits.reshape(-1), labels.reshape(-1).to(pooled_logits.dtype), reduction="none")
        return F.mse_loss(pooled_logits, labels, reduction="none")
    if problem == "single_label_classification":
        return F.cross_entropy(pooled_logits.reshape(-1, config.num_labels), labels.reshape(-1), reduction="none")
    if problem == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(pooled_logits, labels.to(pooled_logits.dtype), reduction="none")
    raise ValueError(f"unknown problem_type {problem!r}")


ELEMENTWISE = {  # loss_utils function name -> (elementwise form, name of the model-output parameter)
    "ForCausalLMLoss": (_causal_lm, "logits"),
    "ForMaskedLMLoss": (_masked_lm, "logits"),
    "ForTokenClassification": (_token_classification, "logits"),
    "ForSequenceClassificationLoss": (_sequence_classification, "pooled_logits"),
}


@functools.lru_cache(maxsize=64)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _parameters(fn) -> Tuple[str, ...]:
    try:
        params = _signature(fn).parameters.values()
    except (TypeError, ValueError):
        return ()
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def function_form(fn: Callable) -> LossForm:
    """The form of ``model.loss_function`` (any callable; known ones get per-sample losses)."""
    name = getattr(fn, "__name__", type(fn).__name__)
    names = _parameters(fn)
    known = ELEMENTWISE.get(name) if getattr(fn, "__module__", "").startswith("transformers.") else None
    out_name = known[1] if known else next((n for n in names if "logits" in n), names[0] if names else "")
    order = (out_name,) + tuple(n for n in names if n != out_name) if out_name else ()

    def as_keywords(output, target) -> Dict[str, Any]:
        target, extra = _split_keywords(target)
        return dict(zip(order, (output,) + tuple(target)), **extra)

    def reduced(output, *target):
        return fn(**as_keywords(output, target))

    if known is None:
        return LossForm(name, reduced, order=order, unavailable=(
            f"the per-sample form of the model's loss function {name} is unknown to cockpit-lite"))
    elementwise_fn = known[0]

    def elementwise(output, *target):
        return elementwise_fn(**as_keywords(output, target))

    return LossForm(name, reduced, elementwise, order=order)


def function_positional(form: LossForm, fn: Callable, args: tuple, kwargs: dict) -> Optional[tuple]:
    """A call ``fn(*args, **kwargs)`` as ``(model output, *target, Keywords(rest))``; None if unbindable."""
    try:
        signature = _signature(fn)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    values = dict(bound.arguments)
    extra = Keywords()
    for name, param in signature.parameters.items():
        if param.kind == param.VAR_KEYWORD:
            extra.update(values.pop(name, {}))
        elif param.kind == param.VAR_POSITIONAL:
            if values.pop(name, ()):
                return None
    if not form.order or any(n not in values for n in form.order):
        return None
    return tuple(values[n] for n in form.order) + (extra,)
