"""Cross-check of an "exact" curvature diagonal against matrix-vector products of the same operator.

BackPACK's second-order rules silently assume plain module settings (zero padding, unweighted losses,
no ignored targets, ...); a setting nobody listed would make its diagonal wrong while it is logged as
exact. Before a diagonal is trusted, a few of its entries are recomputed independently:
A_jj = (A e_j)_j, one Hessian- (or GGN-) vector product per checked entry, on the step's own operator.
Per parameter tensor (up to ``max_tensors`` of them, spread over the network) the entry of largest
magnitude and one drawn at random are checked. Any disagreement beyond float32 rounding
(``rtol`` relative, plus ``atol`` times the largest diagonal entry) is returned as a reason.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

Vector = List[torch.Tensor]


def entries_to_check(diag: Sequence[torch.Tensor], trainable: Sequence[bool], max_tensors: int = 8,
                     seed: int = 0) -> List[tuple]:
    """[(tensor index, flat index)]: the largest-|entry| and a random entry of up to ``max_tensors``
    trainable tensors spread evenly over the list (deterministic: the same in every process)."""
    live = [j for j, t in enumerate(trainable) if t and diag[j].numel()]
    if len(live) > max_tensors:
        step = (len(live) - 1) / (max_tensors - 1)
        live = sorted({live[round(i * step)] for i in range(max_tensors)})
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in live:
        d = diag[j].reshape(-1)
        big = int(d.abs().argmax())
        rand = int(torch.randint(0, d.numel(), (1,), generator=g))
        out += [(j, k) for k in dict.fromkeys([big, rand])]
    return out


def disagreement(diag: Sequence[torch.Tensor], matvec: Callable[[Vector], Vector], params: Sequence[torch.Tensor],
                 trainable: Sequence[bool], names: Sequence[str], *, rtol: float = 1e-3, atol: float = 1e-4,
                 max_tensors: int = 8) -> Optional[str]:
    """None when the checked entries of ``diag`` equal (A e_j)_j, else a reason naming the first mismatch."""
    scale = max((float(d.abs().max()) for d in diag if d.numel()), default=0.0)
    for j, k in entries_to_check(diag, trainable, max_tensors):
        e = [torch.zeros_like(p) for p in params]
        e[j].view(-1)[k] = 1.0
        ref = float(matvec(e)[j].reshape(-1)[k])
        got = float(diag[j].reshape(-1)[k])
        if not abs(got - ref) <= rtol * max(abs(got), abs(ref)) + atol * scale:
            return (f"BackPACK's diagonal disagrees with the curvature-vector product at {names[j]}[{k}] "
                    f"({got:.6g} vs {ref:.6g}): its rules do not cover this model or loss")
    return None
