"""Whether the loop changed the parameters in place after the step's gradient was taken.

A step's values that read the parameters in the optimizer's pre-hook (``param_norm``, ``distance``, the
update d of ``update_size`` and ``alpha``, ``grad_hist_2d``'s parameter values, the curvature's
re-evaluation of the batch) describe the point where the gradient was taken only if nothing changed the
parameters between the backward pass and ``optimizer.step()``. Loops that do: a manual weight decay
(``with torch.no_grad(): p.mul_(1 - wd)`` before the step), sharpness-aware minimization (the gradient
taken at w + e, w restored before the step). Measured on an MLP with ``p.mul_(0.9)`` between backward and
step: distance 0.207 logged for 0 at step 0, param_norm 10% low.

Every in-place change of a tensor bumps its version counter (``Tensor._version``): the counters are noted
when a backward pass that writes the watched ``.grad`` starts (a tensor hook that runs anyway; one int per
parameter, no tensor work) and compared where the step's quantities read the parameters. A change through
``p.data`` (``p.data.mul_()``) does not bump ``p._version`` and is not seen (docs/known-limits.md).

The same note tells a sharpness-aware step's ascent pass from a skipped step: backward passes followed by
an in-place change of the parameters and ``zero_grad()`` without ``optimizer.step()`` were taken at
parameters the loop then moved on purpose; they are dropped, not recorded as a skipped step. SAM restores w
through ``p.data = old_p`` (davda54/sam), which the versions do not see: on a step with such a probe (only
there) the parameters' norms at the probe are kept and compared too (one multi-tensor norm each time).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..quantities import _moved


class ParamVersions:
    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._at_grad: Optional[List[int]] = None
        self._at_probe: Optional[torch.Tensor] = None  # norms after a dropped probe pass (SAM's w + e)

    def probed(self) -> None:
        """A probe pass was dropped (call after ``reset``): the next passes' gradient is taken where the
        parameters are now; keep their norms, so that a restore through ``.data`` shows at the step."""
        self._at_probe = _moved.fingerprint(self.params)

    def note(self) -> None:
        """At a backward pass that writes the watched ``.grad``: the first pass of the step sets the mark."""
        if self._at_grad is None:
            self._at_grad = [p._version for p in self.params]

    def moved(self) -> List[int]:
        """Indices of the parameters changed in place since the step's first backward pass (none if no pass)."""
        if self._at_grad is None:
            return []
        moved = {i for i, (p, v) in enumerate(zip(self.params, self._at_grad)) if p._version != v}
        if self._at_probe is not None:
            moved |= {i for i, c in enumerate(_moved.changed(self._at_probe, self.params).tolist()) if c}
        return sorted(moved)

    def reset(self) -> None:
        self._at_grad = None
        self._at_probe = None

