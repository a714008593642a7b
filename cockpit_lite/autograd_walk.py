"""The autograd nodes upstream of some tensors' nodes, within a budget: the one walk behind the questions the
engine asks of a step's graph at a loss call (is the loss input computed from the model output, does a loss
argument depend on a watched parameter, which returned hidden states are the logits computed from)."""

from __future__ import annotations

from typing import Iterable, Iterator


class Upstream:
    """The nodes reachable from ``starts`` through ``next_functions``, each once, depth first, at most
    ``budget`` of them; ``truncated`` says afterwards whether the budget cut the walk short."""

    def __init__(self, starts: Iterable, budget: int):
        self.starts, self.budget, self.truncated = [s for s in starts if s is not None], budget, False

    def __iter__(self) -> Iterator:
        stack, seen = list(self.starts), set()
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            if len(seen) >= self.budget:
                self.truncated = True
                return
            seen.add(node)
            yield node
            stack.extend(f for f, _ in node.next_functions if f is not None)
