"""Loss calls of one step that read samples an earlier loss call of the step already read.

Two losses on one forward's outputs (a multi-task model's heads: ``l1.backward(retain_graph=True);
l2.backward()`` or ``(l1 + l2).backward()``), or a second forward on the same input tensor (``model(x)``
twice, one loss each), are not micro-batches of different samples: sample i's loss is l1_i + l2_i. Such a
loss call is marked ``MicroBatch.repeats``: the step's ``samples`` leaves it out, the step's loss adds it
up per sample (``loss_combine.micro_batch_weights``), and per-sample quantities are NaN with a reason
(``persample/view_setup.py``).

Seen from the hooks, without keeping tensors alive (weak references only), and decided when the step's
gradients are final, among the back-propagated loss calls (a metric computed on the same batch is not one):

* a loss call repeats when its input is one of its forward's output tensors (or a slice of its rows) with at
  most that output's number of rows, and the rows read by such calls of that forward exceed it (a loss on
  ``out[:B]`` and one on ``out[B:]`` of a [2B, ...] output read each row once: no repeat); a slice's samples
  are its rows (``MicroBatch.batch_size``), not the output's;
* a forward repeats when its first tensor argument is (a tensor still alive at the same memory, shape and
  strides as) the first tensor argument of an earlier back-propagated forward of the step.
"""

from __future__ import annotations

import weakref
from typing import List, Optional

import torch
from torch.utils._pytree import tree_leaves


class _Forward:
    def __init__(self, first: Optional[torch.Tensor]):
        self.input = weakref.ref(first) if first is not None else None
        self.key = (first.data_ptr(), tuple(first.shape), first.stride()) if first is not None else None
        self.outputs: List[weakref.ref] = []
        self.rows: Optional[int] = None
        self.repeated = False  # its input is that of an earlier back-propagated forward of the step

    def same_input(self, other: "_Forward") -> bool:
        mine, theirs = self.input() if self.input else None, other.input() if other.input else None
        return mine is not None and theirs is not None and (mine is theirs or self.key == other.key)


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

    def on_forward(self, output) -> None:
        if self._forward is None:
            return
        leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)]
        self._forward.outputs = [weakref.ref(t) for t in leaves]
        self._forward.rows = int(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else None

    def on_loss(self, mb, loss_input) -> None:
        fwd = self._forward
        if fwd is None:
            return
        rows = None
        if fwd.rows is not None and isinstance(loss_input, torch.Tensor) and 0 < loss_input.dim():
            if int(loss_input.shape[0]) <= fwd.rows and _reads_rows(loss_input, [r() for r in fwd.outputs]):
                rows = int(loss_input.shape[0])
        self._reads.append((mb, fwd, rows))

    def resolve(self) -> None:
        """Mark the step's back-propagated loss calls that repeat samples (``MicroBatch.repeats``)."""
        seen: List[_Forward] = []
        read = {}
        for mb, fwd, rows in self._reads:
            if not mb.backpropagated:
                continue
            if all(f is not fwd for f in seen):
                fwd.repeated = any(fwd.same_input(f) for f in seen)
                seen.append(fwd)
            if fwd.repeated:
                mb.repeats = True
            elif rows is not None:
                read[id(fwd)] = read.get(id(fwd), 0) + rows
                mb.repeats = read[id(fwd)] > fwd.rows
                if rows < fwd.rows:
                    mb.batch_size = rows  # a slice of the output's rows: those are its samples, not all rows
        self._reads = []


def _reads_rows(loss_input: torch.Tensor, outputs) -> bool:
    """Whether ``loss_input`` is one of ``outputs`` or a slice of one along dim 0 (whole rows)."""
    if any(o is loss_input for o in outputs):
        return True
    base = loss_input._base
    return (base is not None and any(o is base for o in outputs) and base.dim() == loss_input.dim()
            and base.shape[1:] == loss_input.shape[1:] and base.stride() == loss_input.stride())
