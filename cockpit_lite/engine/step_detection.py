"""Where a step begins and ends, seen from hooks only (no change to the user's loop).

* a forward pre-hook on the model marks the start of a step (the first training forward after the
  previous step) and keeps the call's inputs on steps that replay the batch;
* a tensor hook on the model output counts backward passes;
* a forward hook on ``loss_fn`` keeps each micro-batch's loss, and a tensor hook on the loss output reads
  the factor the backward pass was started with (1/accumulation, AMP scale);
* the optimizer's step pre-hook runs when ``.grad`` is final; with ``optimizer.step(closure)`` the closure
  is wrapped so that the step is observed once the closure has computed the gradients.

``StepDetection`` is the hook half of ``Cockpit``: it fills the step state (``_micro_batches``,
``_model_calls``, ``_backward_passes``, ``_t_start``) that ``Cockpit._before_step`` turns into a context.
"""

from __future__ import annotations

import time

import torch
from torch.utils._pytree import tree_leaves

from ..backward_end import queue_after_backward
from ..integrations.hf_loss import ModelLoss
from ..persample.output_view import depends_on, first_tensor, observe, target_reason
from ..replay import is_replaying
from ..rng import rng_state
from ..step_context import MicroBatch, ModelCall
from . import loss_elements
from .param_groups import check_param_groups
from .setup import autocast_state, positional


class StepDetection:
    def _pending_backward(self) -> bool:
        return self._backward_passes > 0 or any(m.backpropagated for m in self._micro_batches)

    def _on_model_forward_pre(self, module, args, kwargs):
        if not torch.is_grad_enabled() or is_replaying() or self._quiet:
            return None
        if self._pending_backward() and all(p.grad is None for p in self.watched.params):
            # gradients were cleared (model.zero_grad) after backward without an optimizer step
            self._record_skipped("gradients were cleared after backward() without optimizer.step()")
        if self._open_forwards:
            # a forward inside a forward of the same module: the outer one was a redirection (Lightning's
            # DDP strategy calls training_step through the wrapped module's forward), the inner one is the
            # model's forward on the batch. Only the inner one counts.
            outer = self._open_forwards[-1]
            if outer["call"] is not None and outer["call"] in self._model_calls:
                self._model_calls.remove(outer["call"])
            outer["nested"] = True
        self._open_forwards.append({"call": None, "nested": False})
        self._repeats.on_forward_pre(args)
        self._last_output = None
        if self._t_start is None:
            self._t_start = time.perf_counter()
            self._activate()
            if "layer_io" in self._needs:
                self._arm_layer_capture()
        if "model_inputs" in self._needs:
            call = ModelCall(
                args=tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                kwargs={k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()},
                rng_state=rng_state(), autocast=autocast_state())
            self._model_calls.append(call)
            self._open_forwards[-1]["call"] = call
            self._open_forwards[-1]["buffers"] = self._forward_buffers.before(module)
        return None

    def _arm_layer_capture(self) -> None:
        if self._layer_capture is None:
            from ..persample.capture import LayerCapture

            self._layer_capture = LayerCapture(self.model, self.watched.names, self.watched.params)
            self._layer_capture.reaches = self._reaches_params  # output gradients of training backward passes only
            if self.compiled:
                self._warn_once("compiled", (
                    "cockpit-lite: the model is compiled (torch.compile). Per-sample quantities hook every "
                    "layer, which breaks the compiled graph on the steps they track (dynamo recompiles when "
                    "tracking starts and stops); their values are right, those steps run slower. Track them "
                    "less often, or watch the model before compiling it for exact graphs."))
        self._layer_capture.arm()

    def _on_model_forward(self, module, args, output):
        if not torch.is_grad_enabled() or is_replaying() or self._quiet:
            return None
        opened = self._open_forwards.pop() if self._open_forwards else None
        if opened is not None and opened["nested"]:
            return None  # a redirection around the real forward (see _on_model_forward_pre)
        if opened is not None and opened["call"] is not None:
            opened["call"].buffers = self._forward_buffers.after(opened.get("buffers"))
        self._repeats.on_forward(output, self._reaches_params if "layer_io" in self._needs else None)
        if self._needs:  # a tracked step: how the loss reads the output says what a sample is (its count)
            # held until the loss call (then dropped): a weak reference dies in an inline
            # crit(model(x).view(-1, V), y), where only the view outlives the output's Python object
            self._last_output = first_tensor(output)
        if isinstance(output, torch.Tensor):
            if output.requires_grad:
                output.register_hook(self._count_backward)
            return None
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                leaf.register_hook(self._count_backward)
                break
        return None

    def _count_backward(self, grad):
        if not self._reaches_params():  # an input gradient (backward(inputs=[x]), autograd.grad): not the step's,
            self._reaches_params.defer(self._count_late)  # unless a nested pass (reentrant checkpoint) writes .grad
            return None
        self._backward_passes += 1
        self._param_versions.note()  # where the gradient is taken (param_versions.py): one int per parameter
        if "backward_end" in self._needs and not self._backward_end_queued:
            self._backward_end_queued = True
            queue_after_backward(self._on_backward_end)
        return None

    def _count_late(self) -> None:
        self._backward_passes += 1

    def _on_backward_end(self) -> None:
        """End of a backward pass (after DDP's all-reduce): quantities needing "backward_end"."""
        self._backward_end_queued = False
        for q in self._active or ():
            if "backward_end" in q.needs:
                try:
                    q.on_backward_end(self.step)
                except Exception as err:  # never reaches the loop; the quantity reports NaN at the step
                    self._warn_once(f"fail:{q.name}", f"cockpit-lite: quantity {q.name!r} failed at the end of "
                                                      f"backward ({type(err).__name__}: {err})")

    def _on_loss(self, module, args, kwargs, output):
        if (not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad)
                or is_replaying() or self._quiet):
            return None
        if kwargs:  # crit(input=..., target=...): the per-sample losses re-evaluate it with positions
            args = positional(module, args, kwargs)
        if output.numel() != 1:
            self._warn_once("loss_shape", f"loss_fn returned a tensor of shape {tuple(output.shape)}, not a scalar; "
                                          "its mean is logged as the loss where the loop weighs its elements "
                                          "equally (else see the record's reasons)")
        t0 = time.perf_counter()
        self._activate()
        first = args[0] if args else None
        mb = MicroBatch(
            loss=output.detach().mean(),
            batch_size=int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 0 else None,
        )
        self._repeats.on_loss(mb, first, args[1:], output)  # a second head's loss on the same samples (repeated_samples.py)
        if isinstance(module, ModelLoss):  # a loss divided by the step's count is a part of the step's loss
            mb.combine = module.combine
        # a view of the model output: its rows are the samples (B, not B*T); without a kept output (a loss
        # computed inside forward, as Hugging Face models do with labels=) the loss input's own view is read
        observe(mb, self._last_output, first)
        self._last_output = None
        graded = [(k, [a] if isinstance(a, torch.Tensor) else tree_leaves(a)) for k, a in enumerate(args[1:], 1)
                  if (a.requires_grad if isinstance(a, torch.Tensor) else not isinstance(a, (int, float, str)))]
        if mb.replay is None and graded:  # an argument computed from watched parameters: replays would fix it
            ids = {id(p) for p in self.watched.params}
            moving = next((k for k, ts in graded if depends_on(ts, ids)), None)
            if moving is not None:
                mb.replay = target_reason(moving)
        if "loss_inputs" in self._needs:
            mb.output = first.detach() if isinstance(first, torch.Tensor) else first
            mb.target = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args[1:])

        elements = output.detach() if output.numel() != 1 else None

        def on_loss_grad(grad, mb=mb, reaches=self._reaches_params):
            def taken(scale=grad.detach()):
                # a second backward pass through the same loss (retain_graph=True) adds to .grad and to the layers'
                # captured output gradients: so the scale adds up too (it read 1 where the loop's was 2)
                scale = scale if mb.grad_in is None else mb.grad_in + scale
                mb.grad_in = scale
                mb.loss_scale = scale
                mb.backpropagated = True
                if elements is not None:  # reduction="none": the weights the loop gave the elements
                    mb.per_element = True
                    mb.loss, mb.elements, mb.loss_scale = loss_elements.combined(elements, scale)
                    if mb.elements is None:
                        mb.scale = loss_elements.scaled(mb.loss_scale)

            if reaches():
                taken()
            else:  # an input gradient only, unless a nested pass (reentrant checkpoint) writes .grad after all
                reaches.defer(taken)

        output.register_hook(on_loss_grad)
        self._micro_batches.append(mb)
        self._overhead += time.perf_counter() - t0
        return None

    def _on_step_pre(self, optimizer, args, kwargs):
        """Before the parameters change. With ``optimizer.step(closure)`` (e.g. Lightning) the closure
        computes the gradients inside the step, after this hook: the closure is then replaced by one
        that runs it and observes once it returns (an optimizer evaluating the closure several times,
        like L-BFGS, is observed at its first evaluation)."""
        check_param_groups(self)  # a group added after watch() is not observed: said once (param_groups.py)
        positional_call = len(args) > 1 and args[0] is optimizer
        closure = kwargs.get("closure") if "closure" in kwargs else (args[1] if positional_call else None)
        if closure is None:
            self._before_step()
            return None
        done = []

        def closure_then_observe():
            if done:  # a later evaluation of the same step (L-BFGS): not a new step, not a skipped one
                self._quiet += 1
                try:
                    return closure()
                finally:
                    self._quiet -= 1
            result = closure()
            done.append(True)
            self._before_step()
            return result

        if "closure" in kwargs:
            return args, dict(kwargs, closure=closure_then_observe)
        return (args[0], closure_then_observe) + tuple(args[2:]), kwargs
