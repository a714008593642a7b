"""How the loss calls of one step (its micro-batches) combine into the step's loss.

The loss reduction implies the weights: ``sum``: 1 each; ``mean`` with known batch sizes: each
micro-batch's share of the samples; otherwise the plain mean. A loss already divided by the whole
step's count (Hugging Face's ``num_items_in_batch``, ``MicroBatch.combine == "sum"``) is a part of the
step's loss: the parts add up. Used by the ``loss`` quantity (``StepContext.loss``), the curvature's
re-evaluation (``curvature/batch_loss.py``) and the per-sample shares (``persample/view.py``).
"""

from __future__ import annotations

from typing import Any, List


def micro_batch_weights(mbs: List[Any], reduction: str) -> List[float]:
    """The factor of each micro-batch's loss in the step's loss, as the loss reduction implies.

    ``sum`` (or losses already divided by the step's total count, ``MicroBatch.combine == "sum"``): 1 each;
    ``mean`` with known batch sizes: the sample share (of the distinct samples); otherwise: the plain mean."""
    sizes = [m.batch_size for m in mbs]
    if reduction == "sum" or step_normalised(mbs):
        return [1.0] * len(mbs)
    if reduction == "mean" and all(sizes):
        # loss calls that read samples already read (MicroBatch.repeats: two heads' losses) add to those
        # samples' losses: the mean is over the distinct samples
        n = sum(s for s, m in zip(sizes, mbs) if not getattr(m, "repeats", False)) or sum(sizes)
        return [s / n for s in sizes]
    return [1.0 / len(mbs)] * len(mbs)


def step_normalised(mbs: List[Any]) -> bool:
    """Whether every micro-batch loss is already divided by the step's total count (combined by a sum)."""
    return bool(mbs) and all(m.combine == "sum" for m in mbs)
