"""One process of the data-parallel test (tests/distributed/test_distributed.py), also run alone as the reference.

    python tests/ddp_worker.py RANK WORLD INIT_FILE LOGDIR MODE   # WORLD > 1: DDP over gloo (CPU)
    python tests/ddp_worker.py 0 1 - LOGDIR MODE                  # one process on the whole batch

Every step's global batch is the same in both cases; with WORLD processes, rank r trains on the
r-th contiguous part of it (their concatenation is the global batch). MODE "sgd": plain SGD, one
backward per step; "adam-accum": Adam with two accumulated micro-batches per step; "flaky": plain SGD
with a quantity that raises in process 1 only at step 1, between the others' reductions (the guard
in cockpit_lite/distributed/group.py); the trained parameters are saved beside the log; "flaky0": the
same quantity raising in process 0 (the writer) only, followed by one that makes no reduction;
"sumsfail": the loss's declared sums (engine/calls.py) fail in process 1 only at step 1; "bpfail": plain
SGD with hess_trace, whose BackPACK computation raises in process 1 only at step 1 ("hutchinson": the
same quantities with the estimator forced, the reference for the steps after the fallback).
"""

from __future__ import annotations

import gc
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402
from cockpit_lite.distributed import sum_numbers  # noqa: E402
from cockpit_lite.quantities import REGISTRY, make  # noqa: E402
from cockpit_lite.quantities.base import Quantity  # noqa: E402

STEPS = 3
BATCH = 16
# every quantity, on every step (time is the process's own wall time, not compared)
QUANTITIES = {q: "every" for q in sorted(REGISTRY) if q != "time"}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6 * 6, 12), nn.Tanh(),
                         nn.Linear(12, 5))


def batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 5, (BATCH,), generator=g)


def _fail_backpack_at(step: int, cockpit_lite) -> None:
    """Make BackPACK's exact diagonal raise at ``step`` in this process (an out-of-memory, say)."""
    from cockpit_lite.curvature import backpack_diag

    original = backpack_diag.ExactDiagonal.compute
    calls = []

    def compute(self, batch_loss, kind):
        calls.append(kind)
        if len(calls) - 1 == step:
            raise MemoryError("BackPACK ran out of memory in this process only")
        return original(self, batch_loss, kind)

    backpack_diag.ExactDiagonal.compute = compute


class Flaky(Quantity):
    """Reduces one number per step, except in process ``rank`` at step 1, where it raises before reducing."""

    name = "flaky"

    def __init__(self, rank: int = 1):
        super().__init__("every")
        self.rank = rank

    def before_step(self, ctx):
        dist = ctx.watched.dist
        if ctx.step == 1 and dist is not None and dist.rank == self.rank:
            raise RuntimeError(f"fails in process {self.rank} only")
        (total,) = sum_numbers(dist, [1.0])
        ctx.emit("flaky", total)


class Quiet(Quantity):
    """May reduce (the default), but reduces nothing: its value is its own, the same in every process."""

    name = "quiet"

    def before_step(self, ctx):
        ctx.emit("quiet", 1.0)


def failing_sums_loss():
    """The loss, whose declared sums raise in process 1 only at step 1."""
    base = type(make("loss"))

    class Loss(base):
        def local_sums(self, ctx):
            if ctx.step == 1 and ctx.watched.dist.rank == 1:
                raise RuntimeError("the loss's sums fail in process 1 only")
            return super().local_sums(ctx)

    return Loss("every")


FLAKY_SET = ("norm_test", "inner_test", "mean_gsnr", "grad_hist_1d", "alpha", "loss", "grad_norm")


def run(rank: int, world: int, init_file: str, logdir: str, mode: str) -> None:
    net = model()
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        net = DistributedDataParallel(net)
    accumulate = 2 if mode == "adam-accum" else 1  # the other modes: plain SGD
    opt = torch.optim.Adam(net.parameters(), lr=0.01) if mode == "adam-accum" else torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    quantities = QUANTITIES
    if mode == "flaky":
        quantities = [Flaky()] + [make(q, "every") for q in FLAKY_SET]
    if mode == "sumsfail":
        quantities = [failing_sums_loss(), make("norm_test", "every"), make("grad_hist_1d", "every")]
    if mode == "flaky0":
        quantities = [make("loss", "every"), Flaky(rank=0), Quiet(), make("grad_norm", "every")]
    if mode in ("bpfail", "hutchinson"):
        from cockpit_lite.quantities.hess_trace import HessTrace

        quantities = [HessTrace("every", method="auto" if mode == "bpfail" else "hutchinson"),
                      make("norm_test", "every"), make("loss", "every")]
        if mode == "bpfail" and rank == 1:
            _fail_backpack_at(1, cockpit_lite)
    with cockpit_lite.watch(net, opt, loss_fn=loss_fn, logdir=logdir, quantities=quantities):
        for x, y in batches():
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            opt.zero_grad()
            for xm, ym in zip(x.chunk(accumulate), y.chunk(accumulate)):
                (loss_fn(net(xm), ym) / accumulate).backward()
            opt.step()
    if mode == "flaky" and rank == 0:
        torch.save([p.detach() for p in net.parameters()], os.path.join(logdir, "params.pt"))
    if world > 1:
        # DDP sits in a reference cycle of its own: freed only at interpreter exit, after the process group,
        # its destruction aborts now and then (with or without a cockpit; docs/reliability.md)
        del net, opt
        gc.collect()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
