"""One of 4 processes in two data-parallel groups, [0, 2] and [1, 3] (tests/distributed/test_distributed.py):
each group's cockpit reductions (cockpit_lite.distributed.Group) must stay within that group.

    python tests/ddp_subgroup_worker.py RANK INIT_FILE      # prints "rank R sum S"
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cockpit_lite.distributed import Group  # noqa: E402

rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=rank, world_size=4)
groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every process creates both, as torch requires
group = Group(groups[rank % 2])  # each process watches with its own data-parallel group only
group.enter(0, "test")
print(f"rank {rank} sum {float(group.sum_(torch.tensor([float(rank)]))[0])}", flush=True)
dist.destroy_process_group()
