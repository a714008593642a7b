"""Loss calls of one step that read samples an earlier loss call of the step already read.

Two losses on one forward's outputs (a multi-task model's heads: ``l1.backward(retain_graph=True);
l2.backward()`` or ``(l1 + l2).backward()``), or a second forward on the same input tensor (``model(x)``
twice, one loss each), are not micro-batches of different samples: sample i's loss is l1_i + l2_i. Such a
loss call is marked ``MicroBatch.repeats``: the step's ``samples`` leaves it out, the step's loss adds it
up per sample (``loss_combine.micro_batch_weights``), and per-sample quantities are NaN with a reason
(``persample/view_setup.py``).

Seen from the hooks, without keeping tensors alive (weak references only), and decided when the step's
gradients are final, among the back-propagated loss calls (a metric computed on the same batch is not one):

* a loss call repeats when its input is one of its forward's output tensors (or a slice of its rows or columns:
  ``out[:, :3]`` and ``out[:, 3:]`` are two heads on the same samples) with at most that output's number of rows, and the rows read by such calls of that forward exceed it (a loss on
  ``out[:B]`` and one on ``out[B:]`` of a [2B, ...] output read each row once: no repeat); a slice's samples
  are its rows (``MicroBatch.batch_size``), not the output's;
* a forward repeats when its first tensor argument is (a tensor still alive at the same memory, shape,
  strides and version as) the first tensor argument of an earlier back-propagated forward of the step.

The same bookkeeping finds an objective that is more than loss_fn's: where loss_fn read one output tensor of
a forward (``a, b = model(x); crit(a, y) + mse(b, z)``, ``logits, aux = model(x); crit(logits, y) + aux``)
and a training backward pass reached another that no loss_fn call read, ``MicroBatch.outside`` says so and
per-sample quantities (and alpha, whose losses they are) are NaN with that reason.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, List, Optional

import torch
from torch.utils._pytree import tree_leaves

from ..autograd_walk import Upstream


class _Forward:
    def __init__(self, first: Optional[torch.Tensor]):
        self.input = weakref.ref(first) if first is not None else None
        # the version counter tells a buffer refilled in place (x_buf.copy_(next_batch)) from the same batch
        self.key = (first.data_ptr(), tuple(first.shape), first.stride(), first._version) if first is not None else None
        self.outputs: List[weakref.ref] = []
        self.rows: Optional[int] = None
        self.repeated = False  # its input is that of an earlier back-propagated forward of the step
        self.grad_leaves: set = set()  # positions of its output tensors a training backward pass reached
        self.upstream: set = set()  # positions of its output tensors that a tensor loss_fn read was computed from
        self.hooked = False  # grad_leaves is being noted (a tracked step, several output tensors)
        self.nodes: List[Optional[int]] = []  # id of each output tensor's autograd node, where hooked
        # outputs a loss call's other arguments were made from (GaussianNLLLoss's variance): {position: [(micro-batch,
        # d loss / d output)]}, and the gradient that reached them in backward, to tell whether only loss_fn did
        self.via_args: dict = {}
        self.grads: dict = {}

    def same_input(self, other: "_Forward") -> bool:
        mine, theirs = self.input() if self.input else None, other.input() if other.input else None
        return mine is not None and theirs is not None and self.key == other.key


class RepeatedSamples:
    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """A new step."""
        self._forward: Optional[_Forward] = None
        self._reads: List[tuple] = []  # (micro-batch, its forward, rows it reads of that forward's output or None)

    def on_forward_pre(self, args) -> None:
        first = next((a for a in tree_leaves(args) if isinstance(a, torch.Tensor) and a.dim() > 0), None)
        self._forward = _Forward(first)

    def on_forward(self, output, reaches: Optional[Callable[[], bool]] = None) -> None:
        """``reaches`` (tracked steps): note which output tensors training backward passes reach."""
        fwd = self._forward
        if fwd is None:
            return
        leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        fwd.outputs = [weakref.ref(t) for t in leaves]
        fwd.rows = int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else None
        if reaches is not None and len(leaves) > 1:
            fwd.hooked = True
            # their autograd nodes' ids: an output dropped before the loss call (crit(model(x).logits.view(-1, V), y)
            # drops the hidden states) keeps its node, and its gradient hook, in the graph of what was made from it
            fwd.nodes = [id(t.grad_fn) if t.grad_fn is not None else None for t in leaves]
            for i, leaf in enumerate(leaves):
                if leaf.requires_grad:
                    leaf.register_hook(functools.partial(_note_grad, fwd, i, reaches))

    def on_loss(self, mb, loss_input, others=(), loss=None) -> None:
        """``others``: the loss call's other arguments, ``loss`` its result. An output tensor one of them was made from
        (GaussianNLLLoss's variance returned by the model next to the mean) goes through loss_fn; whether nothing else
        reached it is checked at the step's end against d loss / d output (``_explained``)."""
        fwd = self._forward
        if fwd is None:
            return
        outputs = [r() for r in fwd.outputs]
        rows, leaf = None, _leaf_read(loss_input, outputs)
        if fwd.hooked and leaf is not None:
            fwd.upstream |= _computed_from(loss_input, fwd.nodes, leaf)
            made_from = set()
            for arg in tree_leaves(others):
                if isinstance(arg, torch.Tensor) and arg.grad_fn is not None:
                    made_from |= _computed_from(arg, fwd.nodes, leaf)
            made_from -= fwd.upstream
            if made_from and isinstance(loss, torch.Tensor) and loss.numel() == 1:
                _note_via_args(fwd, mb, loss, outputs, made_from)
        if fwd.rows is not None and isinstance(loss_input, torch.Tensor) and 0 < loss_input.dim():
            if int(loss_input.shape[0]) <= fwd.rows and _reads_rows(loss_input, outputs):
                rows = int(loss_input.shape[0])
        self._reads.append((mb, fwd, rows, leaf))

    def resolve(self) -> None:
        """Mark the step's back-propagated loss calls that repeat samples (``MicroBatch.repeats``)."""
        seen: List[_Forward] = []
        read = {}
        group = {}  # id(forward) -> id of the first forward of the step on the same samples
        for mb, fwd, rows, _ in self._reads:
            if not mb.backpropagated:
                continue
            if all(f is not fwd for f in seen):
                same = next((f for f in seen if fwd.same_input(f)), None)
                fwd.repeated = same is not None
                group[id(fwd)] = group[id(same)] if same is not None else id(fwd)
                seen.append(fwd)
            mb.samples_of = group[id(fwd)]
            if fwd.repeated:
                mb.repeats = True
            elif rows is not None:
                read[id(fwd)] = read.get(id(fwd), 0) + rows
                mb.repeats = read[id(fwd)] > fwd.rows
                if rows < fwd.rows:
                    mb.batch_size = rows  # a slice of the output's rows: those are its samples, not all rows
        self._outside()
        self._reads = []

    def _outside(self) -> None:
        """Mark the loss calls of a forward one of whose output tensors loss_fn read while a training backward
        pass reached another that no back-propagated loss_fn call read (``MicroBatch.outside``)."""
        read, calls = {}, {}
        for mb, fwd, _, leaf in self._reads:
            if mb.backpropagated:
                calls.setdefault(id(fwd), (fwd, []))[1].append(mb)
                if leaf is not None:
                    read.setdefault(id(fwd), set()).add(leaf)
        for key, (fwd, mbs) in calls.items():
            # (a returned hidden state the logits were computed from gets its gradient through them)
            other = sorted(fwd.grad_leaves - read.get(key, set()) - fwd.upstream - _explained(fwd))
            if read.get(key) and other:
                why = (f"output tensor {other[0]} of the model's forward (of {len(fwd.outputs)}) was back-propagated "
                       "without going through loss_fn (a second loss module, or an auxiliary loss the model returns): "
                       "the per-sample losses of loss_fn are not the whole objective")
                for mb in mbs:
                    mb.outside = why


def _note_grad(fwd: _Forward, i: int, reaches, grad) -> None:
    if reaches():
        fwd.grad_leaves.add(i)
        if i in fwd.via_args:  # (summed over backward passes)
            g = grad.detach()
            fwd.grads[i] = g if i not in fwd.grads else fwd.grads[i] + g


def _note_via_args(fwd: _Forward, mb, loss: torch.Tensor, outputs, positions) -> None:
    """d loss / d output for the outputs at ``positions`` (a backward through the loss call only, retained)."""
    pos = sorted(i for i in positions if outputs[i] is not None and outputs[i].requires_grad)
    if not pos:
        return
    try:
        grads = torch.autograd.grad(loss, [outputs[i] for i in pos], retain_graph=True, allow_unused=True)
    except RuntimeError:
        return  # (left unexplained: NaN with the outside reason)
    for i, g in zip(pos, grads):
        fwd.via_args.setdefault(i, []).append((mb, None if g is None else g.detach()))


def _explained(fwd: _Forward) -> set:
    """Outputs that only loss_fn's other arguments reached: the gradient that arrived at each equals the sum of the
    loss calls' d loss / d output times their backward scales (a penalty on the same output, ``crit(mu, y, var) +
    var.mean()``, breaks the equality: outside loss_fn, NaN)."""
    out = set()
    for i, parts in fwd.via_args.items():
        got = fwd.grads.get(i)
        if got is None or any(g is None or mb.loss_scale is None or mb.loss_scale.numel() != 1 for mb, g in parts):
            continue
        want = sum(g * mb.loss_scale.to(g.dtype) for mb, g in parts)
        if bool(torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-30)):
            out.add(i)
    return out


GRAPH_BUDGET = 256  # autograd nodes visited at most, from the loss input towards the model's inputs


def _computed_from(loss_input: torch.Tensor, node_ids, read: int) -> set:
    """Positions of the other output tensors (``node_ids``: their autograd nodes' ids) that ``loss_input`` was
    computed from (a returned hidden state under the logits: a backward pass through loss_fn reaches it), found
    within ``GRAPH_BUDGET`` autograd nodes. A leaf further up is not found, and its gradient counts as a term outside
    loss_fn (NaN, not a wrong value); an extra term on a leaf that is found (a penalty on the hidden states) goes
    unseen here. (An id whose node died was no output's with a gradient: its hook died with it.)"""
    nodes = {n: i for i, n in enumerate(node_ids) if i != read and n is not None}
    if not nodes:
        return set()
    found = set()
    for node in Upstream([loss_input.grad_fn], GRAPH_BUDGET):
        if id(node) in nodes:
            found.add(nodes[id(node)])
            if len(found) == len(nodes):
                break
    return found


def _leaf_read(loss_input, outputs) -> Optional[int]:
    """Which of the forward's output tensors ``loss_input`` is, or is a view of (None: neither)."""
    if not isinstance(loss_input, torch.Tensor):
        return None
    base = loss_input._base
    for i, o in enumerate(outputs):
        # a view of a view shares its root's _base: logits.view(-1, V) of a Linear's [B, T, V] output (itself a
        # view of [B*T, V]) has the output's base, not the output, as its _base
        if o is not None and (o is loss_input or (base is not None and (o is base or o._base is base))):
            return i
    return None


def _reads_rows(loss_input: torch.Tensor, outputs) -> bool:
    """Whether ``loss_input`` is one of ``outputs`` or a view of one whose dim 0 runs over its rows: a slice of
    rows (``out[:B]``), of columns (``out[:, :3]``, one head of a multi-head output: the same samples as the
    other heads), or both. Only for an output whose rows are contiguous blocks of its storage."""
    if any(o is loss_input for o in outputs):
        return True
    base = loss_input._base
    if base is None or loss_input.dim() == 0:
        return False
    for o in outputs:
        if o is None or o.dim() == 0 or not (o is base or o._base is base) or not o.is_contiguous():
            continue
        row = o.stride(0) if o.shape[0] > 1 else o[0].numel()
        rel = loss_input.storage_offset() - o.storage_offset()
        if row <= 0 or rel < 0 or (loss_input.shape[0] > 1 and loss_input.stride(0) != row):
            continue
        # the elements of one loss-input row stay inside one output row, and the rows inside the output's
        span = sum((n - 1) * st for n, st in zip(loss_input.shape[1:], loss_input.stride()[1:]) if n > 0)
        if rel % row + span < row and rel // row + loss_input.shape[0] <= o.shape[0]:
            return True
    return False
