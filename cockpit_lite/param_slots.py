"""Every (module, attribute) slot that holds a parameter or buffer, for ``torch.func.functional_call``.

With its default ``tie_weights=True``, ``functional_call`` (torch 2.14) leaves a submodule registered twice
(``nn.Sequential(l, act, l)``) holding the temporary tensor afterwards instead of its parameter, so the user's
model silently stops training that layer. The re-evaluations (curvature, the per-sample replay) list the slots
themselves and call ``functional_call(..., tie_weights=False)``: a tensor shared by two modules (tied weights)
is given under both names and stays tied.
"""

from __future__ import annotations

from typing import Dict, List, Set

from torch import nn


def aliases(model: nn.Module, slot: str, prefix: str = "") -> Dict[int, List[str]]:
    """id(tensor) -> the names of every (module, attribute) holding it in ``slot`` ("_parameters" or "_buffers"):
    each module object once (a module registered twice has one slot), a tensor shared by two modules under both."""
    out: Dict[int, List[str]] = {}
    for path, mod in model.named_modules():
        for name, t in getattr(mod, slot).items():
            if t is not None:
                out.setdefault(id(t), []).append(prefix + (f"{path}.{name}" if path else name))
    return out


def written_in_forward(model: nn.Module) -> Set[int]:
    """ids of the parameters a module's own forward writes in place: nn.Embedding / nn.EmbeddingBag with max_norm
    renormalise the rows they read (``embedding_renorm_``). A re-evaluation gives them a copy: written through a
    detached alias, the parameter's version counter moved and param_norm, distance, update_size and alpha were NaN
    on every replayed step ("changed in place between the backward pass and optimizer.step()",
    engine/param_versions.py); the training forward renormalised those rows already, so the copy's values agree."""
    return {id(m.weight) for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None}
