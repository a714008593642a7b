"""Tap the projections inside one nn.MultiheadAttention call: their inputs and output gradients.

``F.multi_head_attention_forward`` applies its input projections (``in_proj_weight``, or
``q/k/v_proj_weight``) and ``out_proj`` with ``torch.nn.functional.linear``, looked up at call time.
While a tracked step's attention call runs (``LayerCapture``'s pre-hook to its hook), that name points
to a pass-through that records, for the calls whose weight is one of the module's own parameters, the
input and (through a tensor hook) the gradient that reaches the output; for a block of rows of the packed
weight (cross-attention splits it), which rows. These are exactly the Linear layers' A and D of the
per-sample rule (``attention.py``), taken from the step itself: no recomputation.

Only the thread that started a tap records; the original function is put back when the call ends, and
by ``reset()`` (``LayerCapture.disarm``/``remove``) if a forward raised in between.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

_inner = F.linear  # what F.linear was when the first running tap patched it
_state = threading.local()
_lock = threading.Lock()
_installed = 0  # taps running (all threads); F.linear is patched while > 0


class Tap:
    def __init__(self, module: torch.nn.Module):
        self.names: Dict[int, str] = {id(p): n for n, p in module.named_parameters()
                                      if n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                                               "out_proj.weight")}
        self.records: List[list] = []  # [name, input (detached), output gradient or None, rows or None]

    def record(self, x, weight, out) -> None:
        name, rows = self.names.get(id(weight)), None
        if name is None:  # a block of rows of in_proj_weight (cross-attention: w.split / w.chunk)
            base = getattr(weight, "_base", None)
            name = self.names.get(id(base)) if base is not None else None
            if name is None or weight.dim() != 2 or base.dim() != 2 or weight.stride() != base.stride():
                return
            start, rem = divmod(weight.storage_offset() - base.storage_offset(), base.stride(0))
            if rem:
                return
            rows = (start, start + weight.shape[0])
        if not isinstance(out, torch.Tensor) or not out.requires_grad:
            return
        slot = [name, x.detach(), None, rows]
        self.records.append(slot)

        def keep(grad, slot=slot):
            g = grad.detach()
            slot[2] = g if slot[2] is None else slot[2] + g
        out.register_hook(keep)


def _tapped_linear(input, weight, bias=None):
    out = _inner(input, weight, bias)
    tap = getattr(_state, "tap", None)
    if tap is not None:
        tap.record(input, weight, out)
    return out


def start(module: torch.nn.Module) -> None:
    """Record this thread's projections of ``module`` until ``stop()``."""
    global _installed, _inner
    if getattr(_state, "tap", None) is not None:  # a call that raised before its stop(): drop it
        stop()
    _state.tap = Tap(module)
    with _lock:
        if _installed == 0 and F.linear is not _tapped_linear:
            _inner = F.linear
        _installed += 1
        F.linear = _tapped_linear


def stop() -> Optional[Tap]:
    """The records of this thread's tap (None without one); F.linear is restored when no tap runs."""
    global _installed
    tap = getattr(_state, "tap", None)
    if tap is None:
        return None
    _state.tap = None
    with _lock:
        _installed = max(0, _installed - 1)
        if _installed == 0 and F.linear is _tapped_linear:
            F.linear = _inner
    return tap


def reset() -> None:
    """Drop this thread's tap and restore F.linear if no other thread taps."""
    stop()
