"""When a quantity is computed: every step, every N steps, log-spaced, or at given steps.

A schedule is a callable ``schedule(step) -> bool``; steps count optimizer step boundaries from 0
(skipped steps included). Strings are accepted wherever a schedule is: ``"every"``,
``"every:10"``, ``"log"``, ``"log:20"`` (points per decade), ``"never"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Union


@dataclass(frozen=True)
class Every:
    """Every ``n``-th step, starting at ``offset``."""

    n: int = 1
    offset: int = 0

    def __post_init__(self):
        if int(self.n) < 1:
            raise ValueError(f"Every(n) needs n >= 1, got {self.n}")

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0

    def __str__(self):
        return "every" if self.n == 1 else f"every:{self.n}"


@dataclass(frozen=True)
class LogSpaced:
    """Dense early, sparse later: step 0 and the steps floor(10**(k / per_decade)), k = 0, 1, ..."""

    per_decade: int = 10

    def __post_init__(self):
        if int(self.per_decade) < 1:
            raise ValueError(f"LogSpaced(per_decade) needs per_decade >= 1, got {self.per_decade}")

    def __call__(self, step: int) -> bool:
        if step <= 1:
            return True
        # the k whose floor(10**(k/p)) could equal step; check the neighbours for rounding
        k = int(round(self.per_decade * math.log10(step)))
        return any(math.floor(10 ** (j / self.per_decade) + 1e-9) == step for j in (k - 1, k, k + 1))

    def __str__(self):
        return f"log:{self.per_decade}"


@dataclass(frozen=True)
class AtSteps:
    """Exactly the given steps."""

    steps: frozenset

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def __str__(self):
        return "at:" + ",".join(str(s) for s in sorted(self.steps))


@dataclass(frozen=True)
class Never:
    def __call__(self, step: int) -> bool:
        return False

    def __str__(self):
        return "never"


ScheduleLike = Union[str, int, Callable[[int], bool], Iterable[int], None]


def every(n: int = 1, offset: int = 0) -> Every:
    return Every(int(n), int(offset))


def log_spaced(per_decade: int = 10) -> LogSpaced:
    return LogSpaced(int(per_decade))


def at(steps: Iterable[int]) -> AtSteps:
    chosen = frozenset(int(s) for s in steps)
    if not chosen:
        raise ValueError("an 'at' schedule needs at least one step (use 'never' for none)")
    negative = sorted(s for s in chosen if s < 0)
    if negative:
        raise ValueError(f"steps count from 0: an 'at' schedule cannot hold {negative}")
    return AtSteps(chosen)


def parse(spec: ScheduleLike) -> Callable[[int], bool]:
    """Turn a schedule-like value into a schedule; raise ``ValueError`` on anything else."""
    if spec is None:
        return Every(1)
    if isinstance(spec, bool):
        return Every(1) if spec else Never()
    if isinstance(spec, int):
        return Every(spec)
    if isinstance(spec, str):
        head, _, arg = spec.strip().lower().partition(":")
        try:
            if head == "every":
                return Every(int(arg) if arg else 1)
            if head == "log":
                return LogSpaced(int(arg) if arg else 10)
            if head == "never":
                return Never()
            if head == "at":
                return at(int(s) for s in arg.split(",") if s)
        except ValueError as err:
            raise ValueError(f"bad schedule {spec!r}: {err}") from None
        raise ValueError(f"unknown schedule {spec!r}; use 'every', 'every:N', 'log', 'log:N', 'at:1,2', 'never'")
    if callable(spec):
        return spec
    try:
        return at(spec)
    except TypeError:
        raise ValueError(f"cannot use {spec!r} as a schedule") from None
