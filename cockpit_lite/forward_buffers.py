"""Buffers that a training forward changes in place, as they were before it.

A re-evaluation of a step's forward (curvature's Hessian-vector products, the per-sample replay) runs the model
again on a copy of its buffers. Where the forward changes a buffer before reading it, the copy taken after the step
runs that change a second time: ``spectral_norm`` (``torch.nn.utils.parametrizations`` or the old hook) advances its
power-iteration vectors u, v in every training forward and divides the weight by the sigma of the advanced vectors,
so the re-evaluation differentiated another function (hess_max_ev 0.9898 "converged" for the step's top eigenvalue
0.9942, an extra iteration's). Keeping each buffer's value from before the forward, where the forward changed it,
lets the re-evaluation start where the step started. BatchNorm's running statistics are kept too (harmless: in
training mode the forward reads the batch's statistics).

Cost, on tracked steps that keep the model's inputs only: one copy of the model's buffers during each forward,
dropped at the forward's end for every buffer the forward did not change (a model without buffers: nothing).
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch


def before_forward(model: torch.nn.Module) -> List[Tuple[torch.Tensor, int, torch.Tensor]]:
    """(buffer, its version counter, a copy) for each of the model's buffers, before a forward."""
    return [(b, b._version, b.detach().clone()) for b in {id(b): b for b in model.buffers()}.values()]


def changed_by_forward(snapshot) -> Dict[int, torch.Tensor]:
    """{id(buffer): its value before the forward} for the buffers the forward changed in place."""
    return {id(b): copy for b, version, copy in snapshot or () if b._version != version}


def start_values(buffers, before: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """{id(buffer): the value a re-evaluation of the forward should start from}: the value before the forward where
    it changed it (``before``), else the buffer itself."""
    return {id(b): before.get(id(b), b) for b in buffers}
