"""``grad_norm_preclip``: ||g||_2 as the last backward pass of the step left it, before the user's clipping.

``grad_norm`` reads ``.grad`` when the optimizer steps: after ``clip_grad_norm_`` it is the clipped
norm (a flat ``max_norm`` while clipping fires). This quantity reads ``.grad`` at the end of every
backward pass through the model on the step (``"backward_end"``: after DDP's all-reduce) and keeps the
last: under gradient accumulation, the accumulated gradient of the step. Under a ``torch.amp.GradScaler``
the gradients are then scaled by S; the value is divided by the S that ``GradScaler.unscale_`` divided
them by (``cockpit_lite.amp_scale``), and ``data["grad_norm_preclip"]["unscaled_by"]`` says so.

NaN with a reason when no backward pass through the model was seen on the step, or when the
gradients grew between that pass and the step (clipping and unscaling only shrink them: a backward
pass that did not go through the model's output, or an unknown scaler, changed them unseen).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import amp_scale
from ..norm_batch import norms_of
from .base import Quantity

GREW_TOLERANCE = 1e-3  # relative; rounding of unscaling in float32 is ~1e-7


class GradNormPreclip(Quantity):
    name = "grad_norm_preclip"
    description = ("||g||_2 at the end of the step's last backward pass, before clipping (unscaled under a "
                   "GradScaler); total and grad_norm_preclip/<param>")
    needs = frozenset({"backward_end"})
    reduces = False  # reads the all-reduced .grad that every process has

    def start(self, watched) -> None:
        self._params = watched.params
        self._optimizer = watched.optimizer
        amp_scale.observe()
        self._reset()

    def _reset(self) -> None:
        self._norms: Optional[torch.Tensor] = None
        self._step: Optional[int] = None
        self._scale: Optional[torch.Tensor] = None
        self._at_step: Optional[torch.Tensor] = None
        self._error: Optional[str] = None

    def on_backward_end(self, step: int) -> None:
        amp_scale.take(self._optimizer)  # a scale noted before this pass is not this gradient's
        self._step = step
        try:
            self._norms = self._norms_now()
            self._error = None
        except Exception as err:  # e.g. sparse gradients: NaN with this reason at the step
            self._norms, self._error = None, f"{type(err).__name__} at the end of backward: {err}"

    def _norms_now(self) -> torch.Tensor:
        """float32 norms of every ``.grad`` (0 where there is none), as ``grad_norm`` computes them."""
        grads = [p.grad for p in self._params]
        present = [g for g in grads if g is not None]
        device = present[0].device if present else self._params[0].device
        with torch.no_grad():
            norms = norms_of(present).to(device, torch.float32) if present else torch.zeros(0, device=device)
            if len(present) == len(grads):
                return norms
            out = torch.zeros(len(grads), device=device)
            out[[j for j, g in enumerate(grads) if g is not None]] = norms
            return out

    def before_step(self, ctx) -> None:
        self._scale = amp_scale.take(self._optimizer)
        if self._norms is None or self._step != ctx.step:
            return
        # the norms of .grad at the step, computed with grad_norm's (and the other norms) in one reduction
        self._at_step = ctx.request_norms(ctx.grads(), share="grads")

    def after_step(self, ctx) -> None:
        try:
            self._emit(ctx)
        finally:
            self._reset()

    def _emit(self, ctx) -> None:
        if self._error is not None and self._step == ctx.step:
            ctx.emit_nan(self.name, self._error)
            return
        if self._norms is None or self._step != ctx.step or self._at_step is None:
            ctx.emit_nan(self.name, "no backward pass through the watched model's output was observed on this step")
            return
        norms = self._norms
        if self._scale is not None:
            norms = norms / self._scale.to(norms.device, torch.float32)
        before, at_step = ctx.emit_norm_values(self.name, norms), self._at_step
        ctx.after_values(self.name, functools.partial(self._check, before=before, at_step=at_step))
        if self._scale is not None:
            ctx.emit_data(self.name, {"unscaled_by": float(self._scale)})

    def _check(self, ctx, before, at_step) -> None:
        """Once the values are floats: NaN if the gradients grew between the backward pass and the step."""
        if at_step.error is not None:
            raise RuntimeError(at_step.error)
        b, a = before.total, at_step.total
        if a > b * (1 + GREW_TOLERANCE) + 1e-30:
            ctx.discard(self.name)
            ctx.emit_nan(self.name, (
                f"the gradient norm grew from {b:.6g} at the end of the last backward pass through the model "
                f"to {a:.6g} at the optimizer step: a backward pass that did not go through the watched "
                "model's output, or a loss scaler other than torch.amp.GradScaler, changed .grad unseen"))

    def on_skipped(self, step: int, reason: str) -> None:
        self._reset()
        amp_scale.take(self._optimizer)
