"""Observe the loss a Hugging Face model computes inside its ``forward``, with no change to the model.

``watch(model, optimizer)`` on a ``transformers`` model with no ``loss_fn`` (and the Trainer callback)
use this: a :class:`ModelLoss` module stands for the model's loss, and the cockpit observes it as its
``loss_fn``. The model's own loss calls are found where they happen:

* ``self.loss_function(...)`` (GPT-2 and most recent heads): the model's ``loss_function`` is wrapped
  (the instance attribute, restored at close);
* a loss module made inside ``forward`` (``CrossEntropyLoss()(...)`` in BERT's heads): a global module
  forward hook, active only while the observed model's forward runs (or a cockpit re-evaluates it).

Nothing is recomputed in training: at the end of a training forward, when exactly one loss call was
seen and its result *is* the ``loss`` the model returns, that tensor is handed to the cockpit as the
output of ``ModelLoss`` (so ``loss`` is exactly the model's). When the returned loss is something else
(several loss calls, an auxiliary loss added afterwards), ``loss`` is still the returned value, but the
per-sample quantities (for the rest of the run) and curvature are NaN with the reason: their
decomposition would be wrong.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, List, Optional

import torch

from ..replay import is_replaying
from .hf_loss_forms import LossForm, _signature, function_form, function_positional, module_form, module_positional

_MISSING = object()


def computes_loss_inside(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face ``transformers`` model (its ``forward`` computes the loss)."""
    return any(getattr(cls, "__module__", "").startswith("transformers.") and cls.__name__ == "PreTrainedModel"
               for cls in type(model).__mro__)


class ModelLoss(torch.nn.Module):
    """The loss the observed model computes in ``forward``, as the ``nn.Module`` a cockpit observes.

    Called as ``(model output, *target)``. In training it returns the model's own loss tensor (handed
    over by :class:`ModelLossObserver`); re-evaluations (per-sample losses with ``reduction="none"``,
    curvature) compute the model's loss form again."""

    def __init__(self):
        super().__init__()
        self.reduction = "mean"  # a mean over some count; its normaliser is recovered from the logged loss
        self.form: Optional[LossForm] = None
        self._handover: Optional[torch.Tensor] = None
        #: (key, view): where the model's output holds the loss input (``"logits"``; an index for a tuple output)
        #: and how the loss read it (``output_view.OutputView``), for the per-sample replay
        #: (``persample/replayed.py``: the model re-run per sample with its own arguments, labels included, and the
        #: loss form evaluated on that entry); None if not found
        self.output_key: Any = None
        #: "sum" while the handed-over loss is divided by the whole step's count (num_items_in_batch)
        self.combine: Optional[str] = None

    def forward(self, output, *target):
        if self._handover is not None:
            value, self._handover = self._handover, None
            return value
        from ..persample.losses import LossUnavailable

        form = self.form
        if form is None:
            raise LossUnavailable("no loss computed by the model's forward was seen yet")
        if self.reduction == "none":
            if form.elementwise is None:
                raise LossUnavailable(form.unavailable)
            return form.elementwise(output, *target)
        if form.elementwise is None and form.name == "returned loss":
            from ..curvature.batch_loss import CurvatureUnavailable

            raise CurvatureUnavailable(form.unavailable)
        return form.reduced(output, *target)

    def hand_over(self, form: LossForm, positional: tuple, value: torch.Tensor,
                  combine: Optional[str] = None) -> torch.Tensor:
        """Let the hooks on this module see ``value`` as the loss of ``positional`` (no recomputation)."""
        self.form = form
        self._handover, self.combine = value, combine
        try:
            return self(*positional)
        finally:
            self._handover, self.combine = None, None


class _Call:
    __slots__ = ("form", "positional", "value", "combine")

    def __init__(self, form, positional, value, combine=None):
        self.form, self.positional, self.value, self.combine = form, positional, value, combine


class ModelLossObserver:
    """Finds the loss calls of ``model``'s forward and hands them to ``self.module`` (see the module
    docstring). ``install()`` adds the hooks and the ``loss_function`` wrapper; ``remove()`` undoes them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.module = ModelLoss()
        self._handles: List[Any] = []
        self._previous: Any = _MISSING
        self._wrapper = None
        self._calls: List[_Call] = []
        self._entered: List[bool] = []  # per open forward of the model: whether it is a training forward
        self._in_loss = 0  # > 0 while a caught loss computes (loss modules inside it are part of it)
        self._warned = False
        self._global: Any = None  # the global module forward hook (for loss modules made inside forward)
        self._opaque: Optional[str] = None  # why the last training loss cannot be re-evaluated
        self.watched: Any = None

    # -- install / remove -----------------------------------------------------------------------
    def install(self, watched: Any = None) -> "ModelLossObserver":
        """Add the hooks; ``watched`` (the cockpit's ``Watched``) receives the per-parameter reasons when
        the loss cannot be decomposed."""
        from torch.nn.modules.module import register_module_forward_hook

        self.watched = watched
        model = self.model
        self._global = register_module_forward_hook(self._on_module, with_kwargs=True)
        self._handles = [
            model.register_forward_pre_hook(self._enter, prepend=True),
            model.register_forward_hook(self._exit, prepend=True, always_call=True),
            self._global,
        ]
        original = getattr(model, "loss_function", None) if hasattr(type(model), "loss_function") else None
        if callable(original):
            self._previous = model.__dict__.get("_loss_function", _MISSING)
            self._wrapper = self._wrap(original)
            model.loss_function = self._wrapper
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._wrapper is not None and self.model.__dict__.get("_loss_function") is self._wrapper:
            if self._previous is _MISSING:
                del self.model._loss_function
            else:
                self.model._loss_function = self._previous
        self._wrapper = None

    # -- where loss calls are seen ----------------------------------------------------------------
    def _wrap(self, fn):
        form = function_form(fn)

        @functools.wraps(fn)
        def loss_function(*args, **kwargs):
            if self._in_loss or not self._active():
                return fn(*args, **kwargs)
            self._in_loss += 1
            try:
                value = fn(*args, **kwargs)
            finally:
                self._in_loss -= 1
            positional = function_positional(form, fn, args, kwargs)
            if positional is None:
                positional = (value,)
            self._seen(form, positional, value, "sum" if divided_by_step_count(fn, args, kwargs) else None)
            return value

        return loss_function

    def _on_module(self, module, args, kwargs, output):
        if (self._in_loss or module is self.module or not isinstance(module, torch.nn.modules.loss._Loss)
                or not isinstance(output, torch.Tensor) or not self._active()):
            return None
        self._seen(module_form(module), module_positional(args, kwargs), output)
        return None

    def _active(self) -> bool:
        return is_replaying() or bool(self._entered and self._entered[-1])

    def _seen(self, form: LossForm, positional: tuple, value: torch.Tensor, combine: Optional[str] = None) -> None:
        if is_replaying():  # a re-evaluation (curvature, self-check): its hooks catch the call at once
            if self._opaque is not None:
                from ..curvature.batch_loss import CurvatureUnavailable

                raise CurvatureUnavailable(self._opaque)
            self.module.hand_over(form, positional, value, combine)
        else:
            self._calls.append(_Call(form, positional, value, combine))

    # -- the training forward ---------------------------------------------------------------------
    def _enter(self, module, args) -> None:
        training = torch.is_grad_enabled() and not is_replaying()
        if training and not any(self._entered):
            self._calls = []
        self._entered.append(training)

    def _exit(self, module, args, output) -> None:
        if not self._entered or not self._entered.pop() or any(self._entered):
            return None  # not a training forward, or one nested in another (the outer one decides)
        calls, self._calls = self._calls, []
        loss = _returned_loss(output)
        if loss is None or not loss.requires_grad:
            return None
        self._opaque = None
        if len(calls) == 1 and calls[0].value is loss:
            self.module.hand_over(calls[0].form, calls[0].positional, loss, calls[0].combine)
            self.module.output_key = _output_key(output, calls[0].positional[0] if calls[0].positional else None)
            if calls[0].form.order and self._global is not None:
                # the model computes its loss with loss_function: the global hook (which puts every module
                # call of the process on torch's slow path) is not needed
                self._global.remove()
                self._global = None
            return None
        reason = (f"the loss {type(module).__name__}.forward returns is not the result of one loss call "
                  f"({len(calls)} call(s) seen; e.g. an auxiliary loss added to it), so it cannot be split into "
                  "per-sample losses nor re-evaluated")
        if not self._warned:
            self._warned = True
            warnings.warn(f"cockpit-lite: {reason}; 'loss' is logged, per-sample quantities and curvature are NaN",
                          RuntimeWarning, stacklevel=2)
        self._opaque = reason
        self.module.output_key = None
        failures = getattr(getattr(self, "watched", None), "rule_failures", None)
        if failures is not None:  # every per-sample value of the rest of the run: NaN with this reason
            for name in self.watched.names:
                failures.setdefault(name, reason)
        opaque = LossForm("returned loss", lambda *a: loss, unavailable=reason)
        self.module.hand_over(opaque, (loss,), loss)
        return None


def divided_by_step_count(fn, args: tuple, kwargs: dict) -> bool:
    """Whether a ``loss_function`` call got ``num_items_in_batch``: the Trainer's count of the whole step's
    items (all accumulated micro-batches), so each micro-batch's loss is a part of the step's loss."""
    if kwargs.get("num_items_in_batch") is not None:
        return True
    try:
        bound = _signature(fn).bind_partial(*args, **kwargs).arguments  # cached per loss function
    except (TypeError, ValueError):
        return False
    return bound.get("num_items_in_batch") is not None


def _returned_loss(output) -> Optional[torch.Tensor]:
    """``outputs.loss`` of a ModelOutput / dict, or the first element of a tuple output (``return_dict=False``)."""
    if isinstance(output, dict):
        loss = output.get("loss")
    elif isinstance(output, (tuple, list)) and output:
        loss = output[0]
    else:
        return None
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _output_key(output, loss_input) -> Any:
    """(key or tuple index, view): the entry of ``output`` that the loss function's input is, or is a view of
    (``logits.view(-1, n)`` in BERT's heads); None when it is neither (a copy, a tensor computed from it)."""
    from ..persample.output_view import describe

    if not isinstance(loss_input, torch.Tensor):
        return None
    items = output.items() if isinstance(output, dict) else enumerate(output) if isinstance(output, (tuple, list)) else ()
    try:  # (a tensor without storage, a subclass: no key, the replay says why; never an error in forward)
        for key, value in items:  # the same storage first: describe() of another tensor walks the autograd graph
            if (isinstance(value, torch.Tensor) and value.dim() > 0 and value.device == loss_input.device
                    and value.untyped_storage().data_ptr() == loss_input.untyped_storage().data_ptr()):
                view = describe(value, loss_input)
                if view is not None and view.kind not in ("copy", "cast", "strided"):
                    return key, view
    except Exception:
        return None
    return None


def observe_model_loss(model: torch.nn.Module) -> Optional[ModelLossObserver]:
    """An (uninstalled) observer for a model that computes its loss in ``forward``, else None."""
    return ModelLossObserver(model) if computes_loss_inside(model) else None
