"""Per-sample output gradients of a layer called without the batch dimension and added to a batch.

A position embedding on ``arange(T)`` or ``position_ids`` of shape [1, T] (GPT-2's ``wpe``, BERT's
``position_embeddings``, a learned table in a hand-written transformer) returns [T, d] or [1, T, d], which
an addition broadcasts over the batch: ``h = tok_emb(x) + pos_emb(pos)``. The gradient arriving at its output
is summed over the samples, but the gradient arriving at the sum ``h`` ([B, T, d]) is per sample, and
d h / d pos_emb(pos) is the identity for every sample. So when the layer's output has exactly one consumer in
the forward's autograd graph and that consumer is a plain addition (``AddBackward0``, alpha 1) whose result
has the batch dimension, the layer's call is treated as a call on the batch: its inputs expanded to B rows
(views, no copy) and its output gradient read at the addition (a hook on that node) instead of at the
output. The per-sample gradients are then the layer rule's, exact, with no replay of the model.

Anything else (two consumers, a scaling or dropout before the addition, a concatenation) is left as it was
(the per-sample replay of ``replayed.py``, or NaN with the reason).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch.utils._pytree import tree_leaves

MAX_NODES = 200_000  # the walk over the forward's graph stops here (a model this large keeps the old path)


def _roots(output) -> List[Any]:
    """The autograd nodes of the tensors in the model's output (dicts such as Hugging Face's outputs too)."""
    if isinstance(output, dict):
        output = list(output.values())
    return [t.grad_fn for t in tree_leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def _consumers(roots, targets: Dict[int, Any]) -> Optional[Dict[int, list]]:
    """{id(target node): [(consumer node, input index)]} over the graph below ``roots``; None if too large."""
    found: Dict[int, list] = {k: [] for k in targets}
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if len(seen) > MAX_NODES:
            return None
        for i, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            if id(nxt) in found:
                found[id(nxt)].append((node, i))
            stack.append(nxt)
    return found


def attach(pending: list, output, batch: int) -> None:
    """For each (call, output tensor) of ``pending`` whose output lacks the batch dimension of size ``batch``:
    where its only consumer is a broadcasting addition, read its per-sample output gradient at the addition
    in backward (``LayerCall.broadcast_grad``; ``taken`` then expands the call's inputs to the batch)."""
    todo = [(c, out) for c, out in pending if _lacks_batch(out, batch) and out.grad_fn is not None]
    if not todo or batch < 2:
        return
    found = _consumers(_roots(output), {id(out.grad_fn): out.grad_fn for _, out in todo})
    if found is None:
        return
    for call, out in todo:
        if any(isinstance(a, torch.Tensor) and a.dim() >= 1 and a.shape[0] == batch for a in call.inputs) or any(
                isinstance(v, torch.Tensor) for v in tree_leaves(call.kwargs)):
            continue  # an input with the batch (or a tensor keyword): the output is not a batch-free table
        uses = found[id(out.grad_fn)]
        if len(uses) != 1:
            continue
        node, _ = uses[0]
        if node.name() != "AddBackward0" or getattr(node, "_saved_alpha", 1) != 1:
            continue
        lead = out.shape[0] != 1  # [T, d]: no batch dimension at all (else [1, T, d])
        call.broadcast = (batch, tuple(out.shape), lead)
        node.register_prehook(_reader(call))


def taken(call, grad: torch.Tensor) -> torch.Tensor:
    """The output gradient to keep for ``call``: the per-sample one read at the addition (its inputs then
    expanded to the batch, once), else ``grad`` as it arrived."""
    g = getattr(call, "broadcast_grad", None)
    if g is None:
        return grad
    call.broadcast_grad = None
    batch, _, lead = call.broadcast
    if not getattr(call, "expanded", False):
        call.inputs = tuple(_expanded(a, batch, lead) for a in call.inputs)
        call.expanded = True
    return g


def _lacks_batch(out: torch.Tensor, batch: int) -> bool:
    return out.dim() >= 1 and (out.shape[0] == 1 or out.shape[0] != batch)


def _expanded(a, batch: int, lead: bool):
    if not isinstance(a, torch.Tensor) or a.dim() == 0:
        return a
    if lead:
        return a.unsqueeze(0).expand(batch, *a.shape)
    if a.shape[0] == 1:
        return a.expand(batch, *a.shape[1:])
    return a


def _reader(call):
    def read(grad_outputs):
        g = grad_outputs[0] if grad_outputs else None
        batch, shape, lead = call.broadcast
        want = (batch, *shape) if lead else (batch, *shape[1:])
        if g is not None and tuple(g.shape) == want:
            call.broadcast_grad = g.detach()
        return None

    return read
