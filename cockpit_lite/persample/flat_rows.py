"""Layers called on the batch's positions flattened into rows: ``h.reshape(-1, d)`` of a [B, T, d] tensor.

Hugging Face's OPT (and hand-written MLP blocks) flatten the hidden states before their feed-forward
layers: ``fc1`` and ``fc2`` see [B*T, d] rows, which the layer rules would take for B*T samples. Row-wise
layers (Linear, LayerNorm) give the same values on [B, T, d], so where autograd shows the rows were made
by a view of a [B, T, ..., d] tensor (directly, or through element-wise ops from the output of a layer whose
rows are known), the call is read as a call on [B, T, d]: its input viewed back, its output gradient viewed
alike. The rows of a view are in row-major order of the source's leading dimensions whatever its memory
layout, so the grouping is exact, not a guess. Anything else keeps its rows (NaN with the reason, or the
per-sample replay, as before).
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

# single-tensor-input element-wise ops whose result keeps the rows of their input
ELEMENTWISE = frozenset({
    "ReluBackward0", "GeluBackward0", "TanhBackward0", "SigmoidBackward0", "SiluBackward0", "LeakyReluBackward0",
    "HardtanhBackward0", "EluBackward0", "HardswishBackward0", "MishBackward0", "NativeDropoutBackward0",
    "MulBackward1", "DivBackward1", "CloneBackward0", "ToCopyBackward0", "NegBackward0", "PowBackward0",
})
VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
ROW_WISE = (torch.nn.Linear, torch.nn.LayerNorm)


def lead_of(module, x, known: Dict[int, Tuple[int, ...]]) -> Optional[Tuple[int, ...]]:
    """The leading dimensions (B, T, ...) that the 2-D input ``x`` of a row-wise module flattens, or None."""
    if not isinstance(module, ROW_WISE) or not isinstance(x, torch.Tensor) or x.dim() != 2:
        return None
    node = x.grad_fn
    for _ in range(8):
        if node is None:
            return None
        if id(node) in known:
            lead = known[id(node)]
            return lead if math.prod(lead) == x.shape[0] else None
        name = node.name()
        if name in VIEWS:
            src = tuple(int(s) for s in getattr(node, "_saved_self_sym_sizes", ()))
            if len(src) >= 3 and src[-1] == x.shape[1] and math.prod(src[:-1]) == x.shape[0]:
                return src[:-1]
            return None
        if name not in ELEMENTWISE:
            return None
        node = node.next_functions[0][0] if node.next_functions else None
    return None


def regrouped(t: torch.Tensor, lead: Tuple[int, ...]) -> torch.Tensor:
    """[B*T*..., d] -> [B, T*..., d]."""
    return t.reshape(lead[0], -1, t.shape[-1])
