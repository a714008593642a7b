"""Whether the backward pass now running will write the watched parameters' ``.grad``.

A backward pass that reaches no watched parameter is not part of a training step: an input gradient
(``loss.backward(inputs=[x])``, ``torch.autograd.grad(loss, x)`` for saliency maps or a gradient penalty)
or a backward pass into other parameters only. Its tensor hooks still fire on the model output, the
loss and every layer output on the way; ``ParamReach`` tells the hooks to ignore it, so it is neither a
micro-batch, nor a backward pass of the step, nor part of the captured output gradients.

It asks autograd whether the current graph task will execute each parameter's ``AccumulateGrad`` node
(``torch._C._will_engine_execute_node``), once per graph task. Where that cannot be asked (outside a
backward pass, a torch without it) the answer is yes: the hooks behave as before.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Set

import torch


class ParamReach:
    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        self._nodes: Dict[int, object] = {}  # id(param) -> its AccumulateGrad node (kept: it stays the same)
        self._task = None
        self._answer = True
        self._marked_task = None
        self._reached: Optional[Set[int]] = set()  # ids of the parameters the step's marked passes write

    def __call__(self) -> bool:
        """True unless the running backward pass provably writes no watched parameter's ``.grad``."""
        try:
            task = torch._C._current_graph_task_id()
            if task == -1:
                return True
            if task != self._task:
                # lazily: the first parameter written usually answers (one query per backward pass)
                self._answer = any(torch._C._will_engine_execute_node(n) for _, n in self._accumulators())
                self._task = task
            return self._answer
        except Exception:  # not answerable here: count the pass, as without this check
            return True

    def defer(self, fn) -> None:
        """Call ``fn`` when the running backward pass has ended if it changed a watched ``.grad`` after all: a
        pass whose own graph holds no watched parameter may still write them from a nested backward pass (a
        reentrant ``torch.utils.checkpoint`` around every parameter). Only asked where ``self()`` said no."""
        from ..backward_end import queue_after_backward

        before = self._grad_state()

        def then():
            if self._grad_state() != before:
                fn()

        try:
            queue_after_backward(then)
        except Exception:  # not in a backward pass after all: nothing to wait for
            pass

    def _grad_state(self) -> List[tuple]:
        return [(id(p.grad), p.grad._version) if p.grad is not None else None for p in self.params]

    def mark(self) -> None:
        """Note which parameters the running backward pass writes (once per graph task; called from the
        layer hooks of tracked steps). A parameter no pass of the step wrote (``backward(inputs=head)``)
        has no gradient on the step, whatever gradient reached its layer's output."""
        if self._reached is None:
            return
        try:
            task = torch._C._current_graph_task_id()
            if task == -1 or task == self._marked_task:
                return
            self._marked_task = task
            for p, node in self._accumulators():
                if torch._C._will_engine_execute_node(node):
                    self._reached.add(id(p))
        except Exception:
            self._reached = None  # unknown: every parameter counts as written

    def take(self) -> Optional[Set[int]]:
        """The ids of the parameters written by the marked passes since the last ``take`` (None: unknown,
        or nothing marked), and start over."""
        reached, self._reached, self._marked_task = self._reached, set(), None
        return reached or None

    def _accumulators(self):
        """(parameter, its AccumulateGrad node) for the parameters that require a gradient, lazily."""
        for p in self.params:
            if not p.requires_grad:
                continue
            node = self._nodes.get(id(p))
            if node is None:
                with torch.enable_grad():  # inside a backward pass grad mode is off: no graph to read it from
                    node = p.view_as(p).grad_fn.next_functions[0][0]
                self._nodes[id(p)] = node
            yield p, node
