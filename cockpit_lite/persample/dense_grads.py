"""The step's ``.grad`` as the per-sample statistics read it: dense (a sparse gradient, from
``nn.Embedding(sparse=True)``, has no indexing the layer rules' dot products need)."""

from __future__ import annotations

from typing import List, Optional

import torch


def dense_grads(step) -> List[Optional[torch.Tensor]]:
    """``step.grads()`` (a ``StepInputs`` or the ``StepContext``) with every sparse gradient made dense."""
    return [g.to_dense() if g is not None and g.is_sparse else g for g in step.grads()]


UNDERFLOWED = 1e-300  # the norm given to a nonzero gradient whose float32 norm came out 0 (every square flushed)


def grad_norms(view) -> List[float]:
    """||.grad|| of every parameter of a ``PerSampleView``'s step (0 without one), cached for the step: one
    multi-tensor kernel (the max |.grad| kernel is ~14x slower on the CPU); a nonzero gradient whose squares all
    underflowed (norm 0) gets ``UNDERFLOWED``. This process's ``.grad``: no reduction over the processes of a
    data-parallel run (read by ``underflow.py`` and ``mean_grad.py``'s rounding floor)."""
    if "grad_norms" not in view._cache:
        grads = dense_grads(view.inputs)
        present = [j for j, g in enumerate(grads) if g is not None and g.numel()]
        norms = [0.0] * len(grads)
        if present:
            got = torch._foreach_norm([grads[j].detach().float() for j in present])
            for j, v in zip(present, torch.stack(got).tolist()):
                norms[j] = v if v != 0.0 or not bool(grads[j].detach().any()) else UNDERFLOWED
        view._cache["grad_norms"] = norms
    return view._cache["grad_norms"]
