"""Scratch tensors of the per-sample pass, reused within a tracked step (CPU only).

glibc serves an allocation above its mmap threshold (128 KB at start, raised as such blocks are freed,
to at most 32 MB) with a fresh mapping, and a fresh mapping is faulted in page by page on its first
write: about 1.2-2 us per 4 KB page on the development VMs, the kernel zeroing each page. Within one
tracked step the per-sample pass builds blocks of per-sample gradients of up to 64 MB
(``conv._CHUNK_FLOATS``), one per chunk of samples and layer. Allocated afresh, a ResNet-18's tracked
step faulted 164,000 times, and the batched GEMMs that fill its conv blocks ran 3x slower than into
memory already mapped (benchmarks/scratch_reuse.py, docs/benchmarks.md).

``take(slot, shape, dtype)`` returns a tensor backed by the slot's buffer, grown when too small. It is
valid until the next ``take`` of the same slot: a caller fills and reads it within one call and never
keeps it (blocks kept for a later projection are allocated apart). Only CPU tensors of at least
``MIN_BYTES`` come from a slot (smaller ones are served from malloc's heap without faults, and GPU
allocators cache already); the others are fresh. The buffers are per thread, one per slot (the largest
asked for), and the engine releases them once the step's quantities ran before the optimizer step
(``Cockpit._before_step``) and again at the end of every step (``Cockpit._reset_step_state``).

Slots are for temporaries that the pass would allocate at that size anyway, at the same moment (the
blocks, the shifted input windows, the stacked directions). A small buffer used here and there during the
pass does not belong in one: held from its first use to the end of the step it adds to the pass's peak.
The histogram's scratch (28 MB) and the bias's |delta| copy in slots raised the 3c3d CNN's peak by 44 MB
(144 -> 188 MB, benchmarks/memory.py) for 4 ms per tracked step; they stay fresh allocations.
"""

from __future__ import annotations

import math
import threading
from typing import Sequence

import torch

MIN_BYTES = 1 << 20  # below this malloc's heap serves without fresh mappings
ENABLED = True  # benchmarks/scratch_reuse.py turns it off for the side-by-side comparison

_local = threading.local()


def _slots() -> dict:
    slots = getattr(_local, "slots", None)
    if slots is None:
        slots = _local.slots = {}
    return slots


def take(slot: str, shape: Sequence[int], dtype: torch.dtype = torch.float32,
         device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """An uninitialised tensor of ``shape``, from the slot's reused buffer where that pays (see the module
    docstring); valid until the next ``take`` of ``slot`` in this thread."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    device = torch.device(device)
    if not ENABLED or device.type != "cpu" or n * dtype.itemsize < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    slots = _slots()
    buf = slots.get(slot)
    if buf is None or buf.dtype != dtype or buf.numel() < n:
        slots.pop(slot, None)  # the old buffer first: the peak holds one of them
        buf = slots[slot] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def held_bytes() -> int:
    """Bytes held by this thread's slots."""
    return sum(b.numel() * b.element_size() for b in _slots().values())


def release() -> None:
    """Free this thread's buffers (the next tracked step maps them again)."""
    _slots().clear()
