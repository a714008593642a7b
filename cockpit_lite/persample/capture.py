"""Capture, on tracked steps, each parameterised layer's input(s) and the gradient of its output.

``LayerCapture`` installs one forward hook per module that owns observed parameters directly, plus
a forward hook on the model that numbers the model's training forward calls (micro-batches). While
not armed every hook returns at once. While armed, a layer call keeps its (detached) inputs and
registers a tensor hook on its output that keeps the gradient arriving there. ``disarm`` returns the
step's calls (a ``Captured``); calls without an output gradient (never back-propagated) are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch.utils._pytree import tree_leaves

from . import attention_tap, broadcast, flat_rows, row_order


@dataclass
class LayerCall:
    """One call of a parameterised module during a tracked step."""

    module: torch.nn.Module
    module_name: str
    forward: int  # index of the model forward call (micro-batch) it happened in
    order: int  # position among all captured calls of the step (forward order)
    inputs: Tuple[Any, ...]  # positional inputs, tensors detached
    kwargs: Dict[str, Any]
    training: bool
    output_grad: Optional[torch.Tensor] = None  # d(backward root)/d(output), summed over backward passes
    output: Optional[torch.Tensor] = None  # the output (detached), kept for attention only (attention.py checks it)
    taps: Optional[list] = None  # attention only: its projections' [name, input, output gradient] (attention_tap.py)
    versions: Tuple[int, ...] = ()  # the input tensors' version counters when captured (in-place changes after)
    #: called without the batch dimension and added to a batch (broadcast.py): (batch, output shape, no dim 0)
    broadcast: Optional[tuple] = None
    broadcast_grad: Optional[torch.Tensor] = None  # the per-sample gradient read at that addition, until taken
    expanded: bool = False  # inputs expanded to the batch
    #: a row-wise layer called on [B*T, d] rows flattened from [B, T, d] (flat_rows.py): (B, T, ...)
    flat_lead: Optional[tuple] = None
    #: rows picked from the batch by an index (an expert's tokens, a sorted batch; row_order.py): why, else None
    gathered: Optional[str] = None
    #: rows as many as the batch but broadcast onto another dim of it (broadcast.mark_ambiguous): why, else None
    ambiguous: Optional[str] = None
    #: whether one of the output's other tensors (LSTMCell's c, attention weights used) received a gradient in
    #: backward: such a call has no per-sample rule (``rules.layer_samples``)
    other_grad: bool = False


@dataclass
class Captured:
    calls: List[LayerCall] = field(default_factory=list)
    forwards: int = 0  # model forward calls seen while armed
    reached: Optional[set] = None  # ids of the parameters the step's backward passes wrote (None: unknown)
    overwritten: List[str] = field(default_factory=list)  # modules whose captured input changed in place since


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _first_output(output) -> Optional[torch.Tensor]:
    """The tensor whose gradient is kept: the output itself, or the first tensor of a tuple
    (``nn.MultiheadAttention`` returns ``(attn_output, attn_weights)``)."""
    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor):
            return leaf
    return None


class LayerCapture:
    def __init__(self, model: torch.nn.Module, names: List[str], params: List[torch.Tensor]):
        self.model = model
        self.observed = {id(p) for p in params}
        self.armed = False
        self.reaches = None  # set by the engine: False in a backward pass that writes no watched .grad (grad_reach.py)
        self._captured = Captured()
        self._forward = 0
        self._pending: list = []  # (call, output) of the forward under way
        self._rows_known: dict = {}  # id(output node) -> (B, T): layers of this forward on flattened rows
        self._rows_gathered: dict = {}  # id(output node) -> why: layers of this forward on gathered rows
        self._outputs: dict = {}  # id(output node) -> call, this forward's (row_order.upstream)
        self._handles = []
        self.modules: Dict[str, torch.nn.Module] = {}
        for mname, module in model.named_modules(remove_duplicate=True):
            own = [p for p in module.parameters(recurse=False) if id(p) in self.observed]
            if not own:
                continue
            self.modules[mname] = module
            keeps_output = isinstance(module, torch.nn.MultiheadAttention)
            if keeps_output:  # its projections are tapped during the call (attention_tap.py)
                self._handles.append(module.register_forward_pre_hook(self._start_tap))
            self._handles.append(module.register_forward_hook(self._make_hook(mname, keeps_output), with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._on_model_forward))

    # -- engine API ----------------------------------------------------------------------------
    def arm(self) -> None:
        self._pending = []
        self._rows_known, self._rows_gathered, self._outputs = {}, {}, {}
        self.armed = True
        self._captured = Captured()
        self._forward = 0

    def disarm(self) -> Captured:
        attention_tap.reset()
        captured = self._captured
        captured.forwards = self._forward
        captured.calls = [c for c in captured.calls if c.output_grad is not None]
        captured.overwritten = [c.module_name for c in captured.calls if _overwritten(c)]
        self._pending = []
        self._rows_known, self._rows_gathered, self._outputs = {}, {}, {}
        self.armed = False
        self._captured = Captured()
        self._forward = 0
        return captured

    def remove(self) -> None:
        attention_tap.reset()
        for h in self._handles:
            h.remove()
        self._handles = []
        self.armed = False
        self._captured = Captured()

    # -- hooks -----------------------------------------------------------------------------------
    def _on_model_forward(self, module, args, output):
        if self.armed and torch.is_grad_enabled():
            pending, self._pending = self._pending, []
            self._rows_known, self._rows_gathered, self._outputs = {}, {}, {}
            sizes = [_rows(c) for c in self._captured.calls if c.forward == self._forward]
            sizes = [n for n in sizes if n is not None]
            if pending and sizes:  # some layer called without the batch, or maybe so: broadcast.py
                batch = max(sizes, key=sizes.count)
                if len({out.shape[0] for _, out in pending}) > 1:
                    broadcast.attach(pending, output, batch)
                broadcast.mark_ambiguous(pending, output, batch)
            self._forward += 1
        return None

    def _start_tap(self, module, args):
        if self.armed and torch.is_grad_enabled():
            attention_tap.start(module)

    def _make_hook(self, mname: str, keeps_output: bool = False):
        def hook(module, args, kwargs, output):
            tap = attention_tap.stop() if keeps_output else None
            if not self.armed or not torch.is_grad_enabled():
                return None
            out = _first_output(output)
            if out is None or not out.requires_grad:
                return None
            forward = self._forward
            if forward > 0 and _in_backward():  # a recomputation (reentrant torch.utils.checkpoint) during the
                forward -= 1  # backward pass of the forward that just ended: its calls, not a new forward's
            gathered, sources = row_order.gathered(args[0], self._rows_gathered) if args else (None, ())
            # (rows picked by an index and reshaped, Mixtral's h[None, idx].reshape(-1, d), are not [B, T, d] rows)
            lead = flat_rows.lead_of(module, args[0], self._rows_known) if args and gathered is None else None
            inputs = tuple(_detach(a) for a in args)
            if lead is not None:  # rows flattened from [B, T, d]: read as the call on [B, T, d] (flat_rows.py)
                self._rows_known[id(out.grad_fn)] = lead
                inputs = (flat_rows.regrouped(inputs[0], lead), *inputs[1:])
            if gathered is not None:
                self._rows_gathered[id(out.grad_fn)] = gathered
            for source, why in sources:  # the calls whose output rows an index reordered: not the samples' either
                for earlier in row_order.upstream(source, self._outputs):
                    earlier.gathered = earlier.gathered or why
            call = LayerCall(module=module, module_name=mname, forward=forward,
                             order=len(self._captured.calls),
                             inputs=inputs, flat_lead=lead, gathered=gathered,
                             kwargs={k: _detach(v) for k, v in kwargs.items()},
                             training=module.training,
                             output=out.detach() if keeps_output else None,
                             taps=tap.records if tap is not None else None,
                             versions=tuple(a._version for a in args if isinstance(a, torch.Tensor)))
            self._captured.calls.append(call)
            self._outputs[id(out.grad_fn)] = call
            if out.dim() >= 1 and not _in_backward():
                self._pending.append((call, out))  # until the model's forward ends (broadcast.py)

            def keep_grad(grad, call=call):
                if self.reaches is not None:
                    if not self.reaches():
                        return None  # an input gradient (backward(inputs=[x]), autograd.grad): not the step's
                    self.reaches.mark()
                g = broadcast.taken(call, grad.detach())
                if call.flat_lead is not None:
                    g = flat_rows.regrouped(g, call.flat_lead)
                call.output_grad = g if call.output_grad is None else call.output_grad + g
                return None

            out.register_hook(keep_grad)
            _keep_other_grads(call, output, out, self)
            return None

        return hook


def _keep_other_grads(call: LayerCall, output, out: torch.Tensor, capture) -> None:
    """Note whether a tensor of the output after the first (LSTMCell's ``(h, c)``) gets a gradient: where one does, the
    first tensor's gradient alone does not give the call's per-sample gradients (``rules.layer_samples``)."""
    if isinstance(output, torch.Tensor):  # the common case: one tensor, nothing to do (no pytree walk)
        return

    def note(grad):
        if capture.reaches is None or capture.reaches():
            call.other_grad = True
        return None

    for leaf in tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf is not out and leaf.requires_grad and leaf.is_floating_point():
            leaf.register_hook(note)


def _rows(call: LayerCall) -> Optional[int]:
    """dim 0 of the call's first tensor input, or None."""
    first = next((a for a in call.inputs if isinstance(a, torch.Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() >= 1 else None


def _overwritten(call: LayerCall) -> bool:
    """Whether an input of the call was modified in place after it was captured (a static input buffer refilled
    for the next micro-batch, ``x_buf.copy_(x)``): the captured (shared-memory) input is then another batch's."""
    now = tuple(a._version for a in call.inputs if isinstance(a, torch.Tensor))
    return bool(call.versions) and now != call.versions


def _in_backward() -> bool:
    """Whether this runs inside a backward pass (autograd's current graph task)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except Exception:  # an older torch without it: calls in backward count as a new forward (NaN with a reason)
        return False
