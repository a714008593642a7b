"""Statistics over the global batch of a data-parallel run (``torch.distributed``, e.g. DDP).

Each process sees its shard of the batch. The quantities are defined on the global batch (the
concatenation of all shards), so every per-sample statistic is a *sum over samples* that the shards
add up: ``Group.sum_`` reduces a few numbers per tracked step (never per-sample tensors); the
second moment sum_i g_ij^2 (GSNR, early stopping, CABS, TIC) and the curvature products are
parameter-sized. Every process runs the same quantities on the same steps, so the collectives are
called in the same order everywhere; process 0 writes the log.

Single-process runs have no ``Group`` (``None``) and every helper here is then the identity.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


class Group:
    """The processes of one data-parallel run (a ``torch.distributed`` process group)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        # gloo reduces CPU tensors, nccl CUDA tensors; the buffers below live where the backend wants them
        self.device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", torch.cuda.current_device())

    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) a 1-d tensor; returns the summed tensor on ``flat``'s device."""
        return self._all_reduce(flat, self._dist.ReduceOp.SUM)

    def max_(self, flat: torch.Tensor) -> torch.Tensor:
        """All-reduce (maximum) a 1-d tensor; returns the result on ``flat``'s device."""
        return self._all_reduce(flat, self._dist.ReduceOp.MAX)

    def _all_reduce(self, flat: torch.Tensor, op) -> torch.Tensor:
        buf = flat.to(self.device) if flat.device != self.device else flat
        self._dist.all_reduce(buf, op=op, group=self.group)
        return buf.to(flat.device) if buf is not flat else buf


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


def sum_numbers(group: Optional[Group], values: Sequence[float]) -> List[float]:
    """Sum a few Python numbers over the processes (float64)."""
    if group is None:
        return [float(v) for v in values]
    return group.sum_(torch.tensor([float(v) for v in values], dtype=torch.float64)).tolist()


def sum_tensors(group: Optional[Group], tensors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Sum a list of tensors over the processes with one collective (flattened into one buffer)."""
    if group is None or not tensors:
        return list(tensors)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    flat = group.sum_(torch.cat([t.reshape(-1).to(dtype) for t in tensors]))
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view(t.shape).to(t.dtype))
        i += t.numel()
    return out


def mean_and_var(group: Optional[Group], x: torch.Tensor) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(n, mean, unbiased variance) of the values ``x`` of all processes, in float64 (two passes)."""
    x = x.detach().double().reshape(-1)
    if group is None:
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return int(x.numel()), (x.mean() if x.numel() else nan), (x.var() if x.numel() > 1 else nan)
    n, s = sum_numbers(group, [x.numel(), float(x.sum())])
    mean = torch.tensor(s / n, dtype=torch.float64) if n else torch.tensor(float("nan"), dtype=torch.float64)
    (ss,) = sum_numbers(group, [float(((x - mean) ** 2).sum())])
    var = torch.tensor(ss / (n - 1) if n > 1 else float("nan"), dtype=torch.float64)
    return int(n), mean, var


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
