"""Layers called on rows gathered from the batch: their rows are not the samples, whatever their count.

The layer rules take row i of a call for sample i. A call on a number of rows other than the batch's is
caught by its size (``view_setup.py``), but rows picked from the batch by an index can number exactly B and
still not be the samples in order: the tokens a mixture-of-experts router sends to one expert
(``h.index_select(0, tok)``, ``h[tok]``: B tokens from any samples, on some steps only), a batch sorted by length
inside ``forward`` (``x[perm]``, restored afterwards). The first-step self-check (``engine/selfcheck.py``) sees
this only when it happens on its step and on sample 0; a per-sample value of such a layer was otherwise finite
and wrong (the total inner test of a sorted batch 0.605 for 0.648; an expert fed 4 tokens at B=4: norm test
1.06 for 1.15).

So, while capturing, the input of each call is traced back a few autograd nodes (element-wise and binary
arithmetic ops and reshapes, which keep rows) to an op that picks rows along dim 0 with an index that is not
0..n-1 (``index_select``, advanced indexing, also after leading size-1 dims as in Hugging Face's Mixtral
``h[None, top_x].reshape(-1, d)``, ``gather``, ``flip``/``roll`` of dim 0), or to the output of a call already
found to be on gathered rows (the second layer of the expert); such a call is not regrouped by ``flat_rows.py``
either. The calls whose output such an index reorders are marked too (the layer between sorting a batch and
restoring its order, the layer before manifold mixup's ``h[perm]``). Their parameters come from the per-sample
replay (exact, verified against the step's per-sample losses) or are NaN with the reason. An index that keeps
the rows in order (``h[torch.arange(B), last]``, ``x[:, idx]``) is not a gather. Cost: a bounded walk of at
most ``BUDGET`` nodes per layer call on tracked steps, tensor-free except at an index node.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .flat_rows import ELEMENTWISE, VIEWS

#: ops of two tensors whose result keeps the rows of their inputs (a SwiGLU expert's silu(gate(h)) * up(h))
BINARY = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})
#: reshapes walked through: the rows of a view are those of its source, regrouped (Mixtral's h[None, idx].reshape(-1, d))
RESHAPES = VIEWS | {"UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2"}
#: ops that may pick rows along dim 0 (each judged by its saved arguments: _picks_rows)
PICKERS = frozenset({"IndexSelectBackward0", "IndexBackward0", "GatherBackward0", "FlipBackward0", "RollBackward0"})
BUDGET = 8  # autograd nodes visited per call at most (an expert's SwiGLU: 4; manifold mixup: 6)


def gathered(x, suspects: Dict[int, str]) -> Tuple[Optional[str], list]:
    """(why the rows of ``x``, a layer call's first input, are not the batch's rows in order, or None; [(autograd
    node, why)] for the nodes rows were picked from on the way, whether or not that decided it). ``suspects``:
    {id(autograd node): reason} of the outputs of calls already found on gathered rows. A binary op's rows are
    gathered where every input that has rows is (a SwiGLU expert's silu(gate(h)) * up(h)); one input in order
    keeps its rows those of the samples (manifold mixup's 0.7 h + 0.3 h[perm]: row i is sample i's, mixed)."""
    node = x.grad_fn if isinstance(x, torch.Tensor) else None
    if node is None:  # the model input, or computed without a gradient: no graph to read
        return None, ()
    sources: list = []
    return _status(node, suspects, [BUDGET], sources), sources


def _status(node, suspects, budget, sources) -> Optional[str]:
    if node is None or budget[0] <= 0:
        return None
    budget[0] -= 1
    if id(node) in suspects:
        return suspects[id(node)]
    name = node.name()
    if name in PICKERS:
        op = _picks_rows(node, name)
        if op:
            sources.append((node.next_functions[0][0] if node.next_functions else None,
                            f"has its output's rows reordered by {op} later in the forward"))
            return f"was called on rows picked from the batch by {op}"
    if name in BINARY:
        found = [_status(n, suspects, budget, sources) for n, _ in node.next_functions[:2]
                 if n is not None and n.name() != "AccumulateGrad"]
        return found[0] if found and all(found) else None
    if name in ELEMENTWISE or name in PICKERS or name in RESHAPES:  # (an index that keeps the rows in order)
        return _status(node.next_functions[0][0] if node.next_functions else None, suspects, budget, sources)
    return None


def upstream(node, outputs: Dict[int, object]) -> list:
    """The values of ``outputs`` ({id(autograd node): call}) whose node ``node``'s rows come from through
    element-wise ops: calls whose rows a later index reordered (a batch sorted, its order restored afterwards:
    the rows before the restoring index were not the samples in order either)."""
    found, stack, seen = [], [node], 0
    while stack and seen < BUDGET:
        node = stack.pop()
        if node is None:
            continue
        seen += 1
        if id(node) in outputs:
            found.append(outputs[id(node)])
            continue
        stack.extend(_row_inputs(node))
    return found


def _row_inputs(node) -> list:
    """The nodes whose rows ``node``'s result keeps (none for an op that does not keep rows)."""
    name = node.name()
    if name in BINARY:
        return [n for n, _ in node.next_functions[:2]]
    if name in ELEMENTWISE or name in PICKERS:
        return [n for n, _ in node.next_functions[:1]]
    return []


def _picks_rows(node, name: str) -> Optional[str]:
    """The op, where ``node`` (named ``name``) picks rows along dim 0 other than all of them in order."""
    try:
        if name == "IndexSelectBackward0":
            if int(node._saved_dim) == 0 and not _in_order(node._saved_index, node._saved_self_sym_sizes[0]):
                return "index_select along dim 0"
        elif name == "IndexBackward0":
            # the first indexed dimension, where the ones before it have size 1 (h[None, idx]: h's rows)
            sizes, k = node._saved_self_sym_sizes, 0
            indices = node._saved_indices
            while k < len(indices) and indices[k] is None and int(sizes[k]) == 1:
                k += 1
            if k < len(indices) and indices[k] is not None and not _in_order(indices[k], sizes[k]):
                return "indexing along dim 0 (x[idx])"
        elif name == "GatherBackward0":
            if int(node._saved_dim) == 0:
                return "gather along dim 0"
        elif name in ("FlipBackward0", "RollBackward0"):
            if 0 in tuple(node._saved_dims):
                return f"{name[:-9].lower()} of dim 0"
    except (AttributeError, RuntimeError, IndexError):  # a saved tensor freed, another torch's names
        return None
    return None


def _in_order(index: torch.Tensor, rows) -> bool:
    """Whether ``index`` picks every one of ``rows`` rows once, in order (0..rows-1, or an all-True mask)."""
    rows = int(rows)
    if index.dim() != 1 or index.numel() != rows:
        return False
    if index.dtype == torch.bool:
        return bool(index.all())
    return bool(torch.equal(index, torch.arange(rows, device=index.device, dtype=index.dtype)))


def reason(module_name: str, why: str) -> str:
    return (f"its module ('{module_name}') {why} (the tokens a mixture-of-experts router sends to an expert, a "
            "batch sorted inside forward, rows mixed with a permutation of the batch): its rows are not the samples "
            "in order, whatever their count")
