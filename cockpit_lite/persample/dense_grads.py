"""The step's ``.grad`` as the per-sample statistics read it: dense (a sparse gradient, from
``nn.Embedding(sparse=True)``, has no indexing the layer rules' dot products need)."""

from __future__ import annotations

from typing import List, Optional

import torch


def dense_grads(step) -> List[Optional[torch.Tensor]]:
    """``step.grads()`` (a ``StepInputs`` or the ``StepContext``) with every sparse gradient made dense."""
    return [g.to_dense() if g is not None and g.is_sparse else g for g in step.grads()]
