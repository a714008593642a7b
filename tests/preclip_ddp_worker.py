"""One process of the DDP test of ``grad_norm_preclip`` (tests/quantities/test_grad_norm_preclip.py).

    python tests/preclip_ddp_worker.py RANK WORLD INIT_FILE LOGDIR

DDP over gloo; each rank trains on its half of the global batch, clips with clip_grad_norm_, and
accumulates two micro-batches per step (the first under ``no_sync``). Rank 0 writes, beside the log,
the reference: the gradient norm of the global batch's loss, computed in float64 on a copy of the
parameters by plain autograd in one process (expected.json).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402


def main(rank: int, world: int, init_file: str, logdir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(3)
    expected = []
    with cockpit_lite.watch(ddp, opt, loss_fn=loss_fn, logdir=logdir, quantities=["grad_norm_preclip", "grad_norm"]):
        for _ in range(3):
            micro = [(torch.randn(8, 6, generator=g) * 3, torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
            ref = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
            ref.load_state_dict(model.state_dict())
            full = sum(nn.functional.cross_entropy(ref(x.double()), y) for x, y in micro) / 2
            full.backward()
            expected.append(torch.stack([p.grad.norm() for p in ref.parameters()]).norm().item())
            opt.zero_grad()
            for k, (x, y) in enumerate(micro):
                half = slice(rank * 4, rank * 4 + 4)
                if k == 0:
                    with ddp.no_sync():
                        (loss_fn(ddp(x[half]), y[half]) / 2).backward()
                else:
                    (loss_fn(ddp(x[half]), y[half]) / 2).backward()
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.01)
            opt.step()
    if rank == 0:
        with open(os.path.join(logdir, "expected.json"), "w") as f:
            json.dump(expected, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
