"""Buffers that a training forward changes in place, as they were before it.

A re-evaluation of a step's forward (curvature's Hessian-vector products, the per-sample replay) runs the model
again on a copy of its buffers. Where the forward changes a buffer before reading it, the copy taken after the step
runs that change a second time: ``spectral_norm`` (``torch.nn.utils.parametrizations`` or the old hook) advances its
power-iteration vectors u, v in every training forward and divides the weight by the sigma of the advanced vectors,
so the re-evaluation differentiated another function (hess_max_ev 0.9898 "converged" for the step's top eigenvalue
0.9942, an extra iteration's). Keeping each buffer's value from before the forward, where the forward changed it,
lets the re-evaluation start where the step started. BatchNorm's running statistics are kept too (harmless: in
training mode the forward reads the batch's statistics).

Cost, on tracked steps that keep the model's inputs only: a copy of the buffers forwards change (``ForwardBuffers``:
every buffer on the first such forward, to learn which), dropped at the forward's end where unchanged (a model without
buffers: nothing).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Set, Tuple

import torch


class ForwardBuffers:
    """Copies of the buffers a forward may change, taken before it, kept where it did change them.

    Which buffers a model's forward changes is learned: forwards copy every buffer until the first one in training
    mode has been seen, later ones only those some forward changed (BatchNorm's running statistics, spectral_norm's
    u and v). A large buffer the forward only reads (a frozen table registered as a buffer, a causal mask) is then
    no longer copied on every tracked step. A buffer that a forward changes for the first time after that is not
    restored on that step (as before this file) and is copied from then on."""

    def __init__(self) -> None:
        self.changing: Optional[Set[int]] = None  # ids of the buffers some forward changed; None: none seen yet
        self._learn = True  # whether the forward being watched is one to learn from (training mode)

    def before(self, model: torch.nn.Module) -> List[Tuple[torch.Tensor, int, Optional[torch.Tensor]]]:
        """(buffer, its version counter, a copy or None) for each of the model's buffers, before a forward."""
        every = self.changing is None
        self._learn = model.training  # an eval-mode forward leaves BatchNorm's and spectral_norm's buffers alone
        return [(b, b._version, b.detach().clone() if every or id(b) in self.changing else None)
                for b in {id(b): b for b in model.buffers()}.values()]

    def after(self, snapshot) -> Dict[int, torch.Tensor]:
        """{id(buffer): its value before the forward} for the buffers the forward changed in place."""
        changed = {id(b) for b, version, _ in snapshot or () if b._version != version}
        if self.changing is not None or self._learn:
            self.changing = changed if self.changing is None else self.changing | changed
        return {id(b): copy for b, version, copy in snapshot or () if copy is not None and id(b) in changed}


def start_values(buffers, before: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
    """{id(buffer): the value a re-evaluation of the forward should start from}: the value before the forward where
    it changed it (``before``), else the buffer itself."""
    return {id(b): before.get(id(b), b) for b in buffers}
