"""Side-by-side timing: variants of a training step run interleaved in one process, medians reported.

Machines here are shared and noisy, so variants are never timed in separate runs: each round runs
every variant for a block of steps (in rotating order), and the ratio to the plain loop is taken
per round before the median over rounds. On a GPU the clock is read only after the device has
finished the block (``torch.cuda.synchronize``), so queued kernels are not left out.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(variants: Dict[str, Callable[[], None]], rounds: int = 7, steps: int = 10,
                warmup: int = 3) -> Dict[str, List[float]]:
    """Seconds per step of every variant, one entry per round."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    per_round: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn = variants[name]
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync()
            per_round[name].append((time.perf_counter() - t0) / steps)
    return per_round


def ratios(per_round: Dict[str, List[float]], baseline: str = "plain") -> Dict[str, float]:
    """Median over rounds of (variant time / baseline time in the same round)."""
    base = per_round[baseline]
    return {n: statistics.median(t / b for t, b in zip(ts, base)) for n, ts in per_round.items()}


def medians(per_round: Dict[str, List[float]]) -> Dict[str, float]:
    return {n: statistics.median(ts) for n, ts in per_round.items()}
