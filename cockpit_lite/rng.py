"""The random-number state of a training forward: taken before it, put back to replay it exactly
(dropout masks) when the mini-batch is re-evaluated, then restored so training is unaffected."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional, Tuple

import torch

RngState = Tuple[torch.Tensor, Optional[list]]  # (CPU generator state, CUDA states or None)


def rng_state() -> RngState:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: Optional[Any]) -> None:
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


@contextmanager
def preserved_rng():
    """Whatever the body does to the generators, they are as before afterwards."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for the random probes of ``step``, seeded from (seed, step): the same draws in
    every process of a data-parallel run, whatever happened in each on earlier steps."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (1 << 62))
