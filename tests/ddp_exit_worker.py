"""A watched two-process DDP run (gloo) that ends as user scripts end: the worker returns after
``destroy_process_group()``, no ``os._exit`` (tests/distributed/test_ddp_exit.py).

    python tests/ddp_exit_worker.py LOGDIR QUANTITIES   # QUANTITIES: a preset name, or "none" (unwatched)

Exit code 0: both processes exited normally. The worker checks, before its own exit, that nothing of
the cockpit keeps the DDP module or a process group alive: after ``close()`` and ``del`` of the user's
objects, the DDP module is freed, and no process group the cockpit made is still registered.

The DDP module is freed with ``gc.collect()``: DDP sits in a reference cycle of its own, so without a
collection it lives until interpreter exit and its destruction after ``destroy_process_group()`` then
aborts the process now and then ('terminate called without an active exception') with or without a
cockpit (docs/reliability.md).
"""

from __future__ import annotations

import gc
import os
import sys
import weakref

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402

WORLD = 2


def worker(rank: int, init_file: str, logdir: str, quantities: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    net = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    groups_before = set(dist.distributed_c10d._world.pg_map)
    cockpit = None
    if quantities != "none":
        cockpit = cockpit_lite.watch(net, opt, loss_fn=loss_fn, logdir=logdir, quantities=quantities,
                                     advisor=True)
    g = torch.Generator().manual_seed(rank)
    for _ in range(4):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        loss_fn(net(x), y).backward()
        opt.step()
    if cockpit is not None:
        cockpit.close()
    left = set(dist.distributed_c10d._world.pg_map) - groups_before
    if left:
        raise SystemExit(f"rank {rank}: the closed cockpit left {len(left)} process group(s) registered")
    alive = weakref.ref(net)
    del net, opt
    gc.collect()
    if alive() is not None:
        raise SystemExit(f"rank {rank}: the DDP module is still alive after close() and del: "
                         f"{[type(r).__name__ for r in gc.get_referrers(alive())]}")
    dist.destroy_process_group()


if __name__ == "__main__":
    logdir, quantities = sys.argv[1], sys.argv[2]
    mp.spawn(worker, args=(os.path.join(logdir, "init"), os.path.join(logdir, "log"), quantities), nprocs=WORLD)
