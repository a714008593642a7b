"""Statistics over the global batch of a data-parallel run (``torch.distributed``, e.g. DDP).

Each process sees its shard of the batch. The quantities are defined on the global batch (the
concatenation of all shards), so every per-sample statistic is a *sum over samples* that the shards
add up: ``Group.sum_`` reduces a few numbers per tracked step (never per-sample tensors); the
second moment sum_i g_ij^2 (GSNR, early stopping, CABS, TIC) and the curvature products are
parameter-sized. Every process runs the same quantities on the same steps, so the collectives are
called in the same order everywhere; process 0 writes the log. ``group.py`` guards against a failure in
one process only; docs/distributed.md counts the collectives of a step.

Single-process runs have no ``Group`` (``None``) and every helper here is then the identity.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .group import Group, OutOfStep


def detect(option) -> Optional[Group]:
    """The group to reduce over: ``option`` is "auto" (the default group when torch.distributed is
    initialized with more than one process), None/False (single process), or a process group."""
    if option is None or option is False:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if option == "auto":
            return None
        raise RuntimeError("distributed= was given, but torch.distributed is not initialized")
    group = None if option in ("auto", True) else option
    if dist.get_world_size(group) < 2:
        return None
    return Group(group)


def sum_numbers(group: Optional[Group], values: Sequence[float], what: str = "") -> List[float]:
    """Sum a few Python numbers over the processes (float64); ``what`` names them (see ``Group``)."""
    if group is None:
        return [float(v) for v in values]
    return group.sum_(torch.tensor([float(v) for v in values], dtype=torch.float64), what).tolist()


def sum_tensors(group: Optional[Group], tensors: Sequence[torch.Tensor], what: str = "") -> List[torch.Tensor]:
    """Sum a list of tensors over the processes with one collective (flattened into one buffer);
    ``what`` names them (see ``Group``)."""
    if group is None or not tensors:
        return list(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = group.sum_(torch.cat([t.reshape(-1).to(dtype) for t in tensors]), what)
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def mean_and_var(group: Optional[Group], x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, unbiased variance) of the values ``x`` of all processes, in float64."""
    return means_and_vars(group, [x])[0]


def means_and_vars(group: Optional[Group], xs: Sequence[torch.Tensor]) -> List[Tuple[int, torch.Tensor, torch.Tensor]]:
    """``mean_and_var`` of each of ``xs``, with one collective for all. Each process contributes, per x,
    (n_r, its mean m_r, its sum of squared deviations M_r, two passes over its values); they combine
    exactly as one pass over the global batch would (Chan et al.):
    M = sum_r M_r + sum_r n_r (m_r - m)^2 with m = sum_r n_r m_r / n."""
    xs = [x.detach().double().reshape(-1) for x in xs]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    if group is None:
        return [(int(x.numel()), (x.mean() if x.numel() else nan), (x.var() if x.numel() > 1 else nan)) for x in xs]
    mine = []
    for x in xs:
        m_r = x.mean() if x.numel() else torch.zeros((), dtype=torch.float64)
        mine += [torch.tensor(float(x.numel()), dtype=torch.float64), m_r, ((x - m_r) ** 2).sum()]
    rows = group.gather_(torch.stack(mine), "mean_and_var")  # [processes, 3 per x]
    out = []
    for i in range(len(xs)):
        counts, means, m2s = rows[:, 3 * i], rows[:, 3 * i + 1], rows[:, 3 * i + 2]
        n = int(counts.sum())
        if not n:
            out.append((0, nan, nan))
            continue
        mean = (counts * means).sum() / n
        m2 = m2s.sum() + (counts * (means - mean) ** 2).sum()
        out.append((n, mean, (m2 / (n - 1) if n > 1 else nan)))
    return out


def shard_weight(group: Optional[Group], n_local: int, reduction: str) -> float:
    """The factor of this shard's loss in the global loss: n_local / n_global for a mean reduction
    (the global loss is the mean over all samples), 1 for a sum."""
    if group is None:
        return 1.0
    if reduction == "sum":
        return 1.0
    (n,) = sum_numbers(group, [n_local])
    return n_local / n if n else 0.0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a DistributedDataParallel (or DataParallel) wrapper; hooks and
    parameter names are taken from it, so that names match a single-process run."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


__all__ = ["Group", "OutOfStep", "detect", "sum_numbers", "sum_tensors", "mean_and_var", "means_and_vars", "shard_weight", "unwrap"]
