"""The step's mini-batch loss, re-evaluated as a function of the parameters.

The engine keeps, on steps whose quantities need ``"model_inputs"``, every training forward of the
model (its detached inputs and the RNG state just before it) and every loss call (output, targets).
:func:`rebuild` pairs them into :class:`BatchLoss`, whose ``evaluate(params)`` recomputes the loss
of the whole step (all micro-batches, combined as the loss reduction implies) with
``torch.func.functional_call``:

* dropout is replayed exactly by restoring each forward's RNG state; the RNG state found on entry
  is restored on exit, so training continues bitwise as without the cockpit;
* buffers (BatchNorm running statistics) are passed as clones, so the re-evaluation leaves them
  untouched, each as the step's forward found it (``forward_buffers.py``: spectral_norm's power-iteration vectors
  are not advanced twice); the model runs in its current (training) mode, i.e. with batch statistics, as trained;
* scaled-dot-product attention runs on its math kernel (the fused ones cannot be differentiated twice), and
  weight normalisation on its unfused formula, embeddings without scale_grad_by_freq / sparse (``plain_ops.py``);
* the model is called through its ``forward`` inside a wrapper and the loss through ``loss_fn.forward``,
  so the cockpit's own forward hooks on the model and the loss do not fire again; a model that calls
  the loss module itself inside ``forward`` (Hugging Face style) is replayed with that call's input and
  result, under ``replay.replaying()`` so that no cockpit counts it as a training call.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..persample.output_view import ViewUnavailable, first_tensor, head_target, replay as replay_view
from ..forward_buffers import start_values
from ..replay import replaying
from ..rng import preserved_rng, set_rng_state
from ..loss_combine import micro_batch_weights, step_normalised
from ..param_slots import aliases, written_in_forward
from .plain_ops import needs_plain_ops, plain_ops


class CurvatureUnavailable(RuntimeError):
    """The step's loss cannot be re-evaluated (the reason is what the log records)."""


class _ModelAndLoss(nn.Module):
    """model.forward + the loss, without the hooks registered on either top-level module.

    The loss is ``loss_fn`` on the model output (its first tensor, where it returns several), or, for a model that calls ``loss_fn`` itself inside
    ``forward`` (the Hugging Face style: it returns a dict or a ModelOutput), that call's input and
    result, caught by a hook for the duration of the call. Returns (the loss function's input, loss)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, args, kwargs, target, view=None, batch=None):
        inside = []
        handle = self.loss_fn.register_forward_hook(lambda m, a, out: inside.append((a, out)))
        try:
            with replaying():
                out = self.model.forward(*args, **kwargs)
        finally:
            handle.remove()
        if not inside and not isinstance(out, torch.Tensor) and view is not None:
            # a tuple / dict output and the loss on its first tensor ((logits, aux), nanoGPT's (logits, None)): the
            # tensor the step's view was read from (output_view.first_tensor; no view: the loss read another one);
            # a loss computed from it otherwise fails check_reevaluation or the self-check's losses
            first = first_tensor(out)
            out = out if first is None else first
        if isinstance(out, torch.Tensor) and not inside:
            try:  # the loss input as the training loop read it from the output (logits.view(-1, V), ...)
                out = replay_view(view, out, batch)
            except ViewUnavailable as err:
                raise CurvatureUnavailable(str(err)) from None
            return out, self.loss_fn.forward(out, *target)
        if len(inside) == 1 and inside[0][0] and isinstance(inside[0][0][0], torch.Tensor):
            (loss_input, *_), loss = inside[0]
            return loss_input, loss
        raise CurvatureUnavailable(
            f"the model returns {type(out).__name__} and called the loss function {len(inside)} times in its "
            "forward: curvature needs the loss function called once, on the model output or inside forward")


@dataclass
class Call:
    args: tuple
    kwargs: dict
    target: tuple
    rng_state: Any
    weight: float  # factor of this micro-batch's loss in the step's loss
    batch_size: Optional[int]
    view: Any = None  # the loss input as a view of the model output (persample/output_view.py)
    batch: Optional[tuple] = None  # (b, m): a sub-batch of the first m of b samples
    buffers: Optional[dict] = None  # {id(buffer): value before the forward} where it changed it (forward_buffers.py)


def twice_differentiable_attention():
    """Fused scaled-dot-product-attention kernels (flash / memory-efficient) have no double backward
    nor forward-mode AD; the re-evaluation uses the math kernel, made of differentiable ops."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    except Exception:  # pragma: no cover - older torch
        from contextlib import nullcontext

        return nullcontext()


class BatchLoss:
    """loss(theta) of one step's mini-batch; ``params`` are the observed parameters (theta_t)."""

    def __init__(self, model: nn.Module, loss_fn: nn.Module, names: Sequence[str], params: Sequence[torch.Tensor],
                 calls: List[Call], subbatch: Optional[int] = None):
        self.wrapper = _ModelAndLoss(model, loss_fn)
        model_names = {id(p): n for n, p in model.named_parameters()}
        missing = [n for n, p in zip(names, params) if id(p) not in model_names]
        if missing:
            raise CurvatureUnavailable(f"parameters not in the model cannot be re-evaluated: {missing[:3]}")
        self.keys = ["model." + model_names[id(p)] for p in params]
        # 16-bit parameters: the re-evaluation runs in float32 (parameters, buffers and floating inputs upcast), the
        # loss as a function of the 16-bit values; bfloat16 products left hess_max_ev 0.2% off "converged" and
        # float16 BackPACK diagonals 2.5e-4 off "exact"
        self.dtype = torch.float32 if any(p.dtype in LOW_PRECISION for p in params) else None
        copied = written_in_forward(model)  # Embedding(max_norm) renormalises in place: a copy (param_slots.py)
        self.params = [(p.detach().clone() if id(p) in copied else p.detach())
                       if self.dtype is None or not p.is_floating_point() else p.detach().to(self.dtype)
                       for p in params]
        self._param_keys = [aliases(model, "_parameters", "model.").get(id(p), [k]) for p, k in zip(params, self.keys)]
        # frozen parameters (requires_grad=False, e.g. in a fine-tuning optimizer's group) are constants of
        # the loss: their rows and columns of the Hessian are 0 (``trainable`` masks them in the operators)
        self.trainable = [bool(p.requires_grad) for p in params]
        self.buffers = {"model." + n: b for n, b in model.named_buffers()}
        self._buffer_keys = aliases(model, "_buffers", "model.")
        self.calls = calls
        self.subbatch = subbatch
        self._plain = needs_plain_ops(model)  # weight norm, Embedding(scale_grad_by_freq / sparse): plain_ops.py

    @property
    def num_samples(self) -> Optional[int]:
        sizes = [c.batch_size for c in self.calls]
        return sum(sizes) if all(s is not None for s in sizes) else None

    def _state(self, params: Sequence[torch.Tensor], before: Optional[dict] = None) -> Dict[str, torch.Tensor]:
        """Every (module, attribute) slot of each parameter and buffer, for ``functional_call(tie_weights=False)``:
        with the default ``tie_weights=True``, torch 2.14 leaves a submodule registered twice (``nn.Sequential(l,
        act, l)``) holding the temporary tensor afterwards instead of its parameter, so the user's model no longer
        trains that layer. Listing the slots ourselves keeps tied parameters (``c.weight = a.weight``) tied."""
        state = {}
        # each buffer as the step's forward found it (``before``: spectral_norm's u, v before its power iteration)
        for key, b in start_values({id(b): b for b in self.buffers.values()}.values(), before or {}).items():
            clone = b.clone() if self.dtype is None else cast(b, self.dtype).clone()  # running stats stay untouched
            for k in self._buffer_keys.get(key, ()):
                state[k] = clone
        for keys, p in zip(self._param_keys, params):
            for k in keys:
                state[k] = p
        return state

    def replay(self, params: Sequence[torch.Tensor], index: int):
        """(the loss function's input, loss) of micro-batch ``index`` at ``params``, in its training RNG
        state (the caller restores the generators: ``preserved_rng``)."""
        c = self.calls[index]
        set_rng_state(c.rng_state)
        args, kwargs, target = c.args, c.kwargs, c.target
        if self.dtype is not None:
            args, target = tuple(cast(a, self.dtype) for a in args), tuple(cast(t, self.dtype) for t in target)
            kwargs = {k: cast(v, self.dtype) for k, v in kwargs.items()}
        return functional_call(self.wrapper, self._state(params, c.buffers), (args, kwargs, target, c.view, c.batch),
                               tie_weights=False)

    def kernels(self) -> ExitStack:
        """The re-evaluation's choice of ops (attention's math kernel, ``plain_ops``), also needed around the
        backward passes through it: a checkpointed segment recomputes its forward there, and under another kernel
        its saved tensors differ (torch.utils.checkpoint's CheckpointError "Recomputed values ... have different
        metadata": every curvature value of a checkpointed transformer was NaN)."""
        stack = ExitStack()
        stack.enter_context(twice_differentiable_attention())
        stack.enter_context(plain_ops(self._plain))
        return stack

    def outputs_and_losses(self, params: Sequence[torch.Tensor]):
        """[(model output, weighted loss)] per micro-batch, in the training RNG states."""
        out = []
        with preserved_rng(), self.kernels():
            for i, c in enumerate(self.calls):
                y, loss = self.replay(params, i)
                if loss.numel() != 1:  # reduction='none' that the loop averaged (rebuild refuses the rest:
                    loss = loss.mean()  # sums, masked or weighted means, engine/loss_elements.py)
                out.append((y, loss * c.weight, c))
        return out

    def evaluate(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """The step's loss at ``params`` (a differentiable function of them)."""
        total = None
        for _, loss, _ in self.outputs_and_losses(params):
            total = loss if total is None else total + loss
        return total


def rebuild(step, subbatch: Optional[int] = None) -> BatchLoss:
    """Pair the step's model calls with its loss calls (``step``: its ``StepInputs``, or the context); raise
    :class:`CurvatureUnavailable` if impossible."""
    watched = step.watched
    if not isinstance(watched.loss_fn, nn.Module):
        raise CurvatureUnavailable("curvature needs loss_fn as an nn.Module passed to watch()")
    mbs = [m for m in step.micro_batches if m.backpropagated] or list(step.micro_batches)
    calls_in = list(step.model_calls)
    if not calls_in or not mbs:
        raise CurvatureUnavailable("no model forward / loss call was captured on this step")
    if len(calls_in) != len(step.micro_batches):
        raise CurvatureUnavailable(
            f"{len(calls_in)} model forward(s) but {len(step.micro_batches)} loss call(s) on this step: "
            "cannot pair model inputs with targets")
    if mbs is not step.micro_batches and len(mbs) != len(step.micro_batches):
        keep = [i for i, m in enumerate(step.micro_batches) if m.backpropagated]
        calls_in = [calls_in[i] for i in keep]
    elements = next((m.elements or m.scale for m in mbs if getattr(m, "elements", None) or getattr(m, "scale", None)),
                    None)
    if elements:  # reduction="none" not averaged by the loop (engine/loss_elements.py): its scale or weights unknown
        raise CurvatureUnavailable(elements)
    if any(m.target is None for m in mbs):
        raise CurvatureUnavailable("the loss function's targets were not captured on this step")
    unreplayable = next((m.replay for m in mbs if getattr(m, "replay", None)), None)
    if unreplayable:  # loss_fn on the re-evaluated output is not this loss (persample/output_view.py)
        raise CurvatureUnavailable(unreplayable)
    sizes = [m.batch_size for m in mbs]
    reduction = step.reduction
    weights = micro_batch_weights(mbs, reduction)
    if subbatch is not None and step_normalised(mbs) and any(s is not None and subbatch < s for s in sizes):
        raise CurvatureUnavailable(
            "the loss is divided by the whole step's count (num_items_in_batch), so a sub-batch's loss "
            "re-evaluated with it is not its mean (curvature/batch_loss.py); raise the sub-batch size")
    calls = []
    for mc, mb, w, s in zip(calls_in, mbs, weights, sizes):
        args, kwargs, target = mc.args, mc.kwargs, tuple(mb.target)
        view, batch = getattr(mb, "view", None), None
        if subbatch is not None and s is not None and subbatch < s:
            args, kwargs = _head(args, s, subbatch), {k: _head1(v, s, subbatch) for k, v in kwargs.items()}
            target = tuple(head_target(view, t, s, subbatch) for t in target)
            s, batch = subbatch, (s, subbatch)
        calls.append(Call(args, kwargs, target, mc.rng_state, w, s, view, batch, getattr(mc, "buffers", None)))
    if subbatch is not None and reduction == "mean" and not step_normalised(mbs):
        tot = sum(c.batch_size for c in calls if c.batch_size)
        if tot:
            for c in calls:
                c.weight = c.batch_size / tot
    return BatchLoss(watched.model, watched.loss_fn, watched.names, watched.params, calls, subbatch)


LOW_PRECISION = (torch.float16, torch.bfloat16)


def cast(x, dtype):
    """A 16-bit floating tensor in ``dtype``; anything else unchanged."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype in LOW_PRECISION else x


def _head1(x, n, m):
    return x[:m] if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n else x


def _head(xs, n, m):
    return tuple(_head1(x, n, m) for x in xs)
