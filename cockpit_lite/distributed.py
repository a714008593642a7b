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

import zlib
from typing import List, Optional, Sequence, Tuple

import torch


class OutOfStep(RuntimeError):
    """The processes' cockpit reductions no longer correspond (a quantity failed in some processes
    only, between two reductions); the step's remaining reductions are skipped everywhere."""


class Group:
    """The processes of one data-parallel run, with the cockpit's own communicator.

    Guard against a failure in one process only. Every process runs the same quantities, so the
    reductions are called in the same order everywhere, unless a quantity raises in some processes
    between two of its reductions. Those processes would then skip reductions the others wait in
    (a hang), or pair them with different ones (wrong values). So:

    * the reductions run on a process group of their own (``new_group`` at ``watch``), never paired
      with DDP's gradient reductions;
    * each reduction is announced by a header reduced first (with MAX over ``[tag, size, -tag, -size]``,
      so that equal maxima and minima mean every process announced the same). The tag names the
      reduction: step, quantity, its index there, and what it reduces (``what=``, e.g. "hvp",
      "exact_diag"), so that two reductions of the same size but different meaning never pair. Only
      when every process announced the same one is the payload reduced;
    * after every quantity, each process announces its end (``[tag of "end", 0, failed]``), whether the
      quantity returned or raised. A process that raised early thus meets the others at a header. All
      of them see the mismatch in the same reduction and raise :class:`OutOfStep`. They then skip the
      step's remaining reductions (the quantities report NaN with the reason), so they stay matched and
      resume together on the next step.

    Tags are integers below 2**40, exact in float64. Quantities keep their own state in agreement
    too (per-step probe seeds, an agreed warm start, agreed fallbacks; see the curvature code).
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        backend = dist.get_backend(group)
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
        # only the group's processes take part (several data-parallel groups may each watch at once)
        self.group = dist.new_group(ranks=ranks, backend=backend, use_local_synchronization=True)
        # gloo reduces CPU tensors, nccl CUDA tensors; the buffers below live where the backend wants them
        self.device = torch.device("cpu") if backend == "gloo" else torch.device("cuda", torch.cuda.current_device())
        self._phase, self._index, self._broken = ("", ""), 0, None

    def release(self) -> None:
        """Destroy the cockpit's own process group (at ``close``): nothing of it (gloo's threads, its
        store) outlives the run into the user's ``destroy_process_group()`` and interpreter exit. Local,
        no collective; a group already destroyed (the user's ``destroy_process_group()`` came first) is
        left alone."""
        group, self.group = self.group, None
        self._broken = "the cockpit was closed; its process group is released"
        if group is None:
            return
        try:
            if self._dist.is_initialized():
                self._dist.destroy_process_group(group)
        except (ValueError, RuntimeError):
            pass

    # -- phases: which reduction is which ------------------------------------------------------------
    def enter(self, step: int, name: str) -> None:
        """Reductions from here on belong to ``name`` (a quantity) at ``step``; a new step clears an
        out-of-step state (every process skipped the rest of the previous one)."""
        if self._phase[0] != step:
            self._broken = None
        self._phase, self._index = (step, name), 0

    def end(self, failed: bool) -> bool:
        """The end of the current phase, announced by every process: whether it failed in any of
        them. Raises :class:`OutOfStep` if the processes were not at the same point."""
        self._raise_if_broken()
        return self._header(self._tag("end"), 0, failed)

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise OutOfStep(self._broken)

    def _announce(self, size: int, what: str) -> None:
        """The header of the phase's next reduction (its index, ``what`` it carries, its size)."""
        self._raise_if_broken()
        self._index += 1
        self._header(self._tag(f"{self._index}:{what}"), size)

    def _tag(self, what) -> float:
        return float(zlib.crc32(f"{self._phase[0]}:{self._phase[1]}:{what}".encode()) % (1 << 40) + 1)

    def _header(self, tag: float, size: int, failed: bool = False) -> bool:
        """Check that every process announces (tag, size); returns whether any announced ``failed``."""
        head = torch.tensor([tag, float(size), -tag, -float(size), float(failed)], dtype=torch.float64,
                            device=self.device)
        self._dist.all_reduce(head, op=self._dist.ReduceOp.MAX, group=self.group)
        top_tag, top_size, low_tag, low_size, any_failed = head.cpu().tolist()
        if not (top_tag == -low_tag == tag and top_size == -low_size == size):
            self._broken = (f"the processes' cockpit reductions went out of step at step {self._phase[0]} "
                            f"({self._phase[1]}): a quantity failed in some processes only; this step's "
                            "remaining per-sample and curvature statistics are unavailable")
            raise OutOfStep(self._broken)
        return any_failed > 0

    # -- reductions ----------------------------------------------------------------------------------
    def sum_(self, flat: torch.Tensor, what: str = "") -> torch.Tensor:
        """All-reduce (sum) a 1-d tensor; returns the summed tensor on ``flat``'s device."""
        return self._all_reduce(flat, self._dist.ReduceOp.SUM, what)

    def max_(self, flat: torch.Tensor, what: str = "") -> torch.Tensor:
        """All-reduce (maximum) a 1-d tensor; returns the result on ``flat``'s device."""
        return self._all_reduce(flat, self._dist.ReduceOp.MAX, what)

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order."""
        self._announce(0, "objects")
        out = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def _all_reduce(self, flat: torch.Tensor, op, what: str = "") -> torch.Tensor:
        self._announce(flat.numel(), what)
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
