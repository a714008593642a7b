"""``Group``: the cockpit's own communicator over the processes of a data-parallel run, and its guard
against a failure in one process only (docs/distributed.md)."""

from __future__ import annotations

import zlib

import torch

HEAD = 4  # a check's row starts with: tag, size, failed, the phase's place in its hook
SLOTS = 128  # numbers a check carries with it: a reduction that fits is one collective, header included


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
    * every collective of the cockpit starts with a *check*: one all-gather of a fixed-size row
      ``[tag, size, failed, place, payload...]`` (``HEAD + SLOTS`` float64 numbers, whatever it carries, so that
      two processes at different points still make the same collective). The tag names the reduction:
      step, phase (quantity and hook), its index there, and what it reduces (``what=``, e.g. "hvp",
      "exact_diag"), so that two reductions of the same size but different meaning never pair. Every
      process compares every row with its own: only when all announced the same reduction is its
      result used. A reduction of at most ``SLOTS`` numbers travels in the check's payload (one
      collective: the rows are summed, or maxed, locally in rank order); a larger one follows its check
      as a second collective;
    * a process that raised in a quantity skips that quantity's remaining reductions and meets the
      others at its next check: the next quantity's first one, or the *closing* check that ends each
      hook (``close``, called by the engine once after all the quantities of ``before_step``, once after
      those of ``after_step``; it carries the sums quantities declared), so that no process leaves the
      hook while another waits in it. All of them see the mismatch in the same collective and raise
      :class:`OutOfStep`. They then skip the step's remaining reductions (the quantities report NaN
      with the reason) but the closing checks, so they stay matched and resume together on the next
      step. Every row also says the place of its phase in the hook
      (``enter(..., place=)``: the k-th quantity called, the closing last): ``lowest_place`` is the
      lowest place any process was at when they went out of step. Every process had left the phases
      before it, so no reduction of theirs was skipped or mispaired (a process skipping one would have
      left another waiting there); a call at that place or later that returned in this process has no
      such confirmation and is reported NaN with the reason (``engine/calls.py``).

    Tags are integers below 2**40, exact in float64. Quantities keep their own state in agreement
    too (per-step probe seeds, an agreed warm start, agreed fallbacks; see the curvature code).
    """

    slots = SLOTS

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
        self._place, self.lowest_place = 0, 0

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
    def enter(self, step: int, name: str, place: int = 0) -> None:
        """Reductions from here on belong to ``name`` (a quantity) at ``step``, the ``place``-th phase of its
        hook; a new step clears an out-of-step state (every process skipped the rest of the previous one)."""
        if self._phase[0] != step:
            self._broken = None
        self._phase, self._index, self._place = (step, name), 0, place

    @property
    def broken(self) -> bool:
        """Whether the processes went out of step on this step (every reduction now raises)."""
        return self._broken is not None

    def out_of_step(self) -> OutOfStep:
        return OutOfStep(self._broken or "the processes' cockpit reductions went out of step")

    def end(self, failed: bool) -> bool:
        """The end of the current phase, announced by every process: whether it failed in any of
        them. Raises :class:`OutOfStep` if the processes were not at the same point."""
        self._raise_if_broken()
        return self._check(self._tag("end"), 0, failed)[1]

    def close(self, payload=None) -> torch.Tensor:
        """The closing check of a hook (phase ``enter``-ed by the engine), made out of step too: every
        process that went out of step in the hook saw it in the same collective and made none since, so
        they all meet here. Sums ``payload`` (the hook's declared sums) over the processes: its first
        ``slots`` numbers ride in the check, the rest in further checks (all processes are at the same
        point by then). If the closing check finds them out of step (some process was still at an
        earlier one, and has now given up on it too), it is made once more, where they all meet."""
        if self.group is None:  # released at close: never the default group in its place
            raise OutOfStep(self._broken or "the cockpit's process group is released")
        payload = torch.zeros(0, dtype=torch.float64) if payload is None else payload.reshape(-1)
        first = payload[:self.slots]
        try:
            rows, _ = self._check(self._tag("end"), payload.numel(), payload=first)
        except OutOfStep:
            rows, _ = self._check(self._tag("end"), payload.numel(), payload=first)
        sums = [rows.sum(0)]
        for i in range(self.slots, payload.numel(), self.slots):
            chunk = payload[i:i + self.slots]
            sums.append(self._check(self._tag(f"end:{i}"), chunk.numel(), payload=chunk)[0].sum(0))
        return torch.cat(sums)

    def _raise_if_broken(self) -> None:
        if self._broken is not None:
            raise OutOfStep(self._broken)

    def _announce(self, size: int, what: str, payload=None):
        """The check of the phase's next reduction (its index, ``what`` it carries, its size); returns
        the processes' payload rows [size, k] when ``payload`` (at most ``slots`` numbers) rides along."""
        self._raise_if_broken()
        self._index += 1
        return self._check(self._tag(f"{self._index}:{what}"), size, payload=payload)[0]

    def _tag(self, what) -> float:
        return float(zlib.crc32(f"{self._phase[0]}:{self._phase[1]}:{what}".encode()) % (1 << 40) + 1)

    def _check(self, tag: float, size: int, failed: bool = False, payload=None):
        """One fixed-size all-gather: every process announces (tag, size), ``failed`` and up to ``slots``
        numbers. Returns (the payload rows [processes, k] in float64, or None; whether any announced
        ``failed``); raises :class:`OutOfStep` unless every process announced the same (tag, size)."""
        row = torch.zeros(HEAD + self.slots, dtype=torch.float64, device=self.device)
        row[:HEAD] = torch.tensor([tag, float(size), float(failed), float(self._place)], dtype=torch.float64)
        k = 0
        if payload is not None:  # copied where it lies (a CUDA payload never goes through the host here)
            k = payload.numel()
            row[HEAD:HEAD + k] = payload.detach().reshape(-1).to(self.device, torch.float64)
        out = torch.empty(self.size * row.numel(), dtype=torch.float64, device=self.device)
        self._all_gather(out, row)
        rows = out.view(self.size, -1).cpu()
        if not (bool((rows[:, 0] == tag).all()) and bool((rows[:, 1] == float(size)).all())):
            self._broken = (f"the processes' cockpit reductions went out of step at step {self._phase[0]} "
                            f"({self._phase[1]}): a quantity failed in some processes only; this step's "
                            "remaining per-sample and curvature statistics are unavailable")
            self.lowest_place = int(rows[:, 3].min())
            raise OutOfStep(self._broken)
        return (rows[:, HEAD:HEAD + k] if payload is not None else None), bool((rows[:, 2] > 0).any())

    # -- reductions ----------------------------------------------------------------------------------
    def sum_(self, flat: torch.Tensor, what: str = "") -> torch.Tensor:
        """All-reduce (sum) a 1-d tensor; returns the summed tensor on ``flat``'s device."""
        return self._reduce(flat, "sum", what)

    def max_(self, flat: torch.Tensor, what: str = "") -> torch.Tensor:
        """All-reduce (maximum) a 1-d tensor; returns the result on ``flat``'s device."""
        return self._reduce(flat, "max", what)

    def gather_(self, flat: torch.Tensor, what: str = "") -> torch.Tensor:
        """Every process's ``flat`` (1-d), as float64 rows [processes, numel] in rank order, on the CPU."""
        if flat.numel() <= self.slots:
            return self._announce(flat.numel(), what, payload=flat)
        self._announce(flat.numel(), what)
        out = torch.empty(self.size * flat.numel(), dtype=flat.dtype, device=self.device)
        self._all_gather(out, flat.reshape(-1).to(self.device))
        return out.view(self.size, -1).to("cpu", torch.float64)

    def _all_gather(self, out: torch.Tensor, row: torch.Tensor) -> None:
        """``out`` [processes * n] <- every process's ``row`` [n] (``all_gather_single`` from torch 2.14 on)."""
        gather = getattr(self._dist, "all_gather_single", None) or self._dist.all_gather_into_tensor
        gather(out, row, group=self.group)

    def gather_objects(self, obj) -> list:
        """Every process's ``obj`` (picklable), in rank order."""
        self._announce(0, "objects")
        out = [None] * self.size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def _reduce(self, flat: torch.Tensor, op: str, what: str = "") -> torch.Tensor:
        if flat.numel() <= self.slots:  # with its check: one collective, combined here in rank order
            rows = self._announce(flat.numel(), what, payload=flat)
            combined = rows.sum(0) if op == "sum" else rows.max(0).values
            return combined.reshape(flat.shape).to(flat.device, flat.dtype)
        self._announce(flat.numel(), what)
        buf = flat.to(self.device) if flat.device != self.device else flat
        reduce_op = self._dist.ReduceOp.SUM if op == "sum" else self._dist.ReduceOp.MAX
        self._dist.all_reduce(buf, op=reduce_op, group=self.group)
        return buf.to(flat.device) if buf is not flat else buf
