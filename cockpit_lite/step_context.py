"""What one optimizer step hands to the quantities, and what they record.

``StepContext`` is built when a tracked step begins, passed to ``before_step`` and ``after_step``
of every active quantity, and turned into one log record after the step. Expensive intermediates
that several quantities share (gradients, the update d) are computed once, on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Container, Dict, Hashable, List, Optional, Set

import torch

from .loss_combine import micro_batch_weights
from .norm_batch import NormBatch, NormGroup, convert


@dataclass
class MicroBatch:
    """One call of the loss function whose result was back-propagated (one per backward pass)."""

    loss: torch.Tensor  # detached scalar, as the loss function returned it
    batch_size: Optional[int]
    output: Optional[torch.Tensor] = None  # model output given to the loss (detached), if kept
    target: Any = None  # the loss function's other arguments, if kept
    loss_scale: Optional[torch.Tensor] = None  # d(backward root)/d(loss): 1/accum, AMP scale, ...
    backpropagated: bool = False
    #: the gradient that reached the loss, summed over the backward passes through it (retain_graph=True twice)
    grad_in: Optional[torch.Tensor] = None
    view: Any = None  # persample.output_view.OutputView: the loss input as a view of the model output
    #: "sum" when the loss is already divided by the whole step's count (Hugging Face's num_items_in_batch):
    #: the step's loss is then the sum of its micro-batch losses, not their mean
    combine: Optional[str] = None
    #: (key, sample id of each loss element), cached by persample/losses.py for this call's layout
    sample_ids: Any = None
    #: it reads samples an earlier loss call of the step read (two heads' losses, a forward repeated on the
    #: same input): not counted in the step's samples (engine/repeated_samples.py)
    repeats: bool = False
    #: the loss calls of the step on the same samples share this key (the forward they read; repeated_samples.py)
    samples_of: Optional[int] = None
    #: why the objective is more than loss_fn's (another output of the forward back-propagated outside it)
    outside: Optional[str] = None
    #: why the loss couples the samples (a product of two tensors made from the model output), else None
    coupled: Optional[str] = None
    #: why loss_fn applied to the re-evaluated model output cannot give this loss again (its input computed from
    #: the output outside forward, an argument computed with gradients), else None (persample/output_view.py)
    replay: Optional[str] = None
    #: loss_fn returned one loss per element and the loop combined them with unequal weights: why its mean
    #: is not the back-propagated loss (engine/loss_elements.py), else None
    elements: Optional[str] = None
    per_element: bool = False  # loss_fn returned one loss per element (reduction="none")
    #: its elements weighed equally but not as a mean (d root / d mean(l) > 1: a sum, or a scaled loss): why the
    #: loop's loss and curvature are not known (the per-sample quantities, scale-free, are)
    scale: Optional[str] = None


@dataclass
class ModelCall:
    """One training forward call of the model, kept on steps whose quantities need "model_inputs"
    (to re-evaluate the mini-batch, e.g. for Hessian-vector products)."""

    args: tuple
    kwargs: dict
    rng_state: Any  # (cpu_state, cuda_states or None): restore it to replay dropout exactly
    autocast: Any = None  # (device type, dtype) of an enclosing torch.autocast, else None
    # {id(buffer): its value before this forward} for the buffers the forward changed in place (forward_buffers.py)
    buffers: Any = None


@dataclass
class StepInputs:
    """What a step's derived views (``PerSampleView``) read: the step's inputs, not the ``StepContext``.

    The context owns the view; the view must not point back at the context (nor at anything that does),
    or the two form a reference cycle that keeps every tracked step's captured activations alive until
    Python's cyclic garbage collector happens to run.
    """

    step: int
    watched: Any
    micro_batches: List[MicroBatch]
    reduction: str
    active: list
    layer_io: Any = None
    model_calls: List[ModelCall] = field(default_factory=list)

    @property
    def names(self) -> List[str]:
        return self.watched.names

    @property
    def params(self) -> List[torch.Tensor]:
        return self.watched.params

    def grads(self) -> List[torch.Tensor]:
        return current_grads(self.watched.params)


_UNSET = object()  # StepContext._loss before the loss is combined (None is a value: no loss seen)


def current_grads(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """``.grad`` of every parameter (zeros where it is None), as the optimizer sees it."""
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


class StepContext:
    def __init__(self, step: int, watched, micro_batches: List[MicroBatch], reduction: str):
        self.step = step
        self.watched = watched
        self.micro_batches = micro_batches
        self.reduction = reduction
        self.values: Dict[str, Any] = {}
        self.reasons: Dict[str, str] = {}
        self.data: Dict[str, Any] = {}
        self.flags: Set[str] = set()
        self.late: Dict[int, Dict[str, Dict[str, Any]]] = {}  # earlier step -> values/reasons/data
        self._norms = NormBatch()  # norms asked for, computed in one reduction per phase (norm_batch.py)
        self._norm_groups: List[tuple] = []  # (key, NormGroup) recorded as key and key/<param name>
        self._checks: List[Any] = []  # callables run once the values are floats (after_values)
        # intermediates the step's quantities share, built once (``once``): keyed by the function that
        # builds them and its arguments, never by a string
        self._shared: Dict[tuple, Any] = {}
        self._grads: Optional[List[torch.Tensor]] = None
        self._loss: Any = _UNSET
        self.params_before: Optional[List[torch.Tensor]] = None
        self._update: Optional[List[torch.Tensor]] = None
        self._neg_update: Optional[List[torch.Tensor]] = None
        self.layer_io = None  # per-layer inputs/output gradients, on steps needing "layer_io"
        self.model_calls: List[ModelCall] = []  # on steps needing "model_inputs"
        self._per_sample = None
        self.active: list = []  # the step's active quantities (set by the engine)
        # timings and counts the engine and quantities hand each other (declared, not cache keys)
        self.t_start: Optional[float] = None  # perf_counter at the step's first training forward
        self.t_hook: Optional[float] = None  # perf_counter when the step post-hook began
        self.t_overhead: float = 0.0  # seconds the hooks spent before the post-hook
        self.samples_global: Optional[int] = None  # samples of the global batch (DDP; set by 'loss')
        # names of the parameters the loop changed in place between the step's backward pass and the step
        # (engine/param_versions.py): what reads them in the pre-hook is not at the gradient's point
        self.moved_since_grad: List[str] = []

    def per_sample_if_built(self):
        """The step's ``PerSampleView`` if a quantity asked for it, else None (never builds it)."""
        return self._per_sample

    @property
    def per_sample(self):
        """Per-sample statistics of the step (``cockpit_lite.persample.PerSampleView``), built on
        first use from the captured layer inputs/output gradients and the micro-batches."""
        if self._per_sample is None:
            if self.layer_io is None:
                if any("layer_io" in q.needs for q in getattr(self, "active", None) or ()):
                    raise RuntimeError(
                        "no layer inputs were captured: the watched model's forward did not run in this step "
                        "(per-sample quantities need the training forward of the module passed to watch())")
                raise RuntimeError("per-sample statistics need a quantity that declares the 'layer_io' need")
            from .persample import PerSampleView

            self._per_sample = PerSampleView(self.inputs())
        return self._per_sample

    def inputs(self) -> StepInputs:
        """The step's inputs, for a view the context keeps (no reference back to the context)."""
        return StepInputs(self.step, self.watched, self.micro_batches, self.reduction, list(self.active),
                          self.layer_io, self.model_calls)

    def once(self, build: Callable[..., Any], *args: Hashable) -> Any:
        """``build(self, *args)``, computed on the first call of this step and shared afterwards by every
        quantity asking with the same function and arguments (the curvature operators, BackPACK's
        diagonals, Hutchinson estimates: quantities/_curvature.py). A build that raises is not remembered."""
        key = (build, args)
        if key not in self._shared:
            self._shared[key] = build(self, *args)
        return self._shared[key]

    # -- inputs ------------------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return self.watched.names

    @property
    def params(self) -> List[torch.Tensor]:
        return self.watched.params

    def grads(self) -> List[torch.Tensor]:
        """``.grad`` of every observed parameter (zeros where it is None), as the optimizer sees it."""
        if self._grads is None:
            self._grads = current_grads(self.watched.params)
        return self._grads

    def loss(self) -> Optional[torch.Tensor]:
        """The step's mini-batch loss: micro-batch losses combined as the loss reduction implies.

        ``mean``: the sample-weighted mean; ``sum``: the sum; otherwise the plain mean.
        None when no loss function call was seen.
        """
        if self._loss is not _UNSET:
            return self._loss
        mbs = [m for m in self.micro_batches if m.backpropagated] or self.micro_batches
        value = None
        if len(mbs) == 1:
            value = mbs[0].loss
        elif mbs:
            losses = torch.stack([m.loss.float() for m in mbs])
            w = torch.tensor(micro_batch_weights(mbs, self.reduction), dtype=losses.dtype, device=losses.device)
            value = (losses * w).sum()
        self._loss = value
        return value

    def update_norms_source(self) -> List[torch.Tensor]:
        """-d or d (same norms), whichever is at hand without another pass over the parameters."""
        if self._update is not None:
            return self._update
        self._negative_update()
        return self._neg_update

    def _negative_update(self) -> None:
        if self._neg_update is None:
            if self.params_before is None:
                raise RuntimeError("the update is only known after the step, for quantities needing 'update'")
            with torch.no_grad():  # in place in the engine's snapshot buffer: no allocation per step
                torch._foreach_sub_(self.params_before, self.watched.params)
            self._neg_update, self.params_before = self.params_before, None

    @property
    def update(self) -> List[torch.Tensor]:
        """d = theta_{t+1} - theta_t per parameter (after the step; needs ``"update"``).

        Valid during ``after_step`` only: the buffer is reused by the next step (copy it to keep it).
        """
        if self._update is None:
            self._negative_update()
            with torch.no_grad():
                torch._foreach_neg_(self._neg_update)
            self._update, self._neg_update = self._neg_update, None
        return self._update

    # -- outputs -----------------------------------------------------------------------------
    def emit(self, key: str, value: Any) -> None:
        """Record a scalar (a float or a 0-d tensor; tensors are converted in one batch later)."""
        self.values[key] = value

    def emit_norms(self, key: str, tensors: List[torch.Tensor], share: Optional[str] = None) -> None:
        """Record the L2 norm of each tensor as ``key/<param name>`` and of all of them as ``key``.

        Computed later with every other norm of the step in one reduction (``flush_norms``; the tensors
        must not change before: the engine flushes after the last ``before_step``, and again when the
        record is assembled). ``share`` names a list that other quantities may ask for too ("grads").
        """
        if not tensors:
            self.emit_nan(key, "no parameters")
            return
        self._norm_groups.append((key, self._norms.request(tensors, share)))

    def request_norms(self, tensors: List[torch.Tensor], share: Optional[str] = None) -> NormGroup:
        """The per-tensor norms of ``tensors`` for a quantity's own use, computed with the step's other
        norms: ``group.norms`` after ``flush_norms``, ``group.values`` / ``group.total`` in ``after_values``."""
        return self._norms.request(tensors, share)

    def flush_norms(self) -> None:
        """Compute every norm asked for so far (one reduction per device)."""
        if self._norms.waiting:
            self._norms.flush()

    def emit_norm_values(self, key: str, norms: torch.Tensor) -> NormGroup:
        """Record per-parameter norms already computed (a 1-D tensor in parameter order) as
        ``key/<param name>`` and their combined L2 norm as ``key``, like ``emit_norms``."""
        group = NormGroup(norms=norms.detach().reshape(-1))
        self._norm_groups.append((key, group))
        return group

    def after_values(self, name: str, check) -> None:
        """Run ``check(ctx)`` once the step's values are floats (before the record is assembled): it may
        read ``NormGroup.values`` / ``.total`` and replace what was emitted (``discard``, ``emit_nan``).
        If it raises, what ``name`` emitted is replaced by NaN with the error as reason. (``check`` must not
        hold the context itself: it gets it as argument, so that no reference cycle keeps the step alive.)"""
        self._checks.append((name, check))

    def discard(self, name: str) -> None:
        """Forget what was recorded for ``name`` and its parts (``name/...``) on this step."""
        for store in (self.values, self.reasons, self.data):
            for key in [k for k in store if k == name or k.startswith(name + "/")]:
                del store[key]
        self._norm_groups = [(k, v) for k, v in self._norm_groups if not (k == name or k.startswith(name + "/"))]

    def withdraw(self, name: str, reason: str, keep: Container[str] = ()) -> None:
        """In an ``after_values`` check: replace what ``name`` recorded on this step, its total and every
        part, by NaN with ``reason``, except the per-parameter norms ``name/<param>`` of the parameters in
        ``keep`` (their values stay)."""
        keys = {k for k in self.values if k == name or k.startswith(name + "/")}
        kept = {}
        for key, group in self._norm_groups:
            if key == name or key.startswith(name + "/"):
                keys.add(key)
                if group.values is not None and len(group.values) > 1:
                    for pname, x in zip(self.watched.names, group.values):
                        keys.add(f"{key}/{pname}")
                        if pname in keep:
                            kept[f"{key}/{pname}"] = x
        if not keys:
            return
        self.discard(name)
        for key in keys:
            if key in kept:
                self.values[key] = kept[key]
            else:
                self.emit_nan(key, reason)

    def emit_nan(self, key: str, reason: str) -> None:
        """Record that ``key`` could not be computed on this step, and why."""
        self.values[key] = math.nan
        self.reasons[key] = reason

    def emit_data(self, key: str, obj: Any) -> None:
        """Record a JSON-able structure (histogram, fit details, provenance)."""
        self.data[key] = obj

    def emit_for_step(self, step: int, key: str, value: Any = None, *, reason: Optional[str] = None,
                      data: Any = None) -> None:
        """Record a value that belongs to an earlier step (e.g. ``alpha`` of step t, known at t+1).

        It is written as an amendment record for ``step``; ``Run`` merges it into that step's record.
        Give ``value`` (a float), or ``reason`` (the value is NaN), and/or ``data`` (a structure).
        """
        late = self.late.setdefault(int(step), {"values": {}, "reasons": {}, "data": {}})
        if reason is not None:
            late["values"][key] = math.nan
            late["reasons"][key] = reason
        elif value is not None:
            late["values"][key] = float(value)
        if data is not None:
            late["data"][key] = data

    def flag(self, text: str) -> None:
        self.flags.add(text)

    def scalar_values(self) -> Dict[str, float]:
        """All emitted scalars as Python floats, converting tensors with one transfer per device."""
        self.flush_norms()
        scalars = {k: v for k, v in self.values.items() if isinstance(v, torch.Tensor)}
        converted = convert([g for _, g in self._norm_groups] + self._norms.groups, scalars)
        checks, self._checks = self._checks, []
        for name, check in checks:
            try:
                check(self)
            except Exception as err:
                self.discard(name)
                self.emit_nan(name, f"{type(err).__name__} in {name} (checking its values): {err}")
        out: Dict[str, float] = {}
        for key, v in self.values.items():
            if isinstance(v, torch.Tensor):
                out[key] = converted[key] if key in converted else float(v)
            else:
                out[key] = float(v) if v is not None else math.nan
        names = self.watched.names
        for key, group in self._norm_groups:
            if group.error is not None:
                out[key] = math.nan
                self.reasons[key] = f"{group.error} (computing the norms of {key})"
                continue
            parts = group.values
            out[key] = group.total
            if parts is not None and len(parts) > 1:
                for name, x in zip(names, parts):
                    out[f"{key}/{name}"] = x
        return out

