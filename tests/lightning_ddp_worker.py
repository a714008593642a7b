"""The Lightning DDP run of tests/integrations/test_integration_lightning.py: two CPU processes (gloo), each
training on its shard of every global batch, with a CockpitCallback in each.

    python tests/lightning_ddp_worker.py LOGDIR     # Lightning starts the second process itself

The data are test_integration_lightning's; each process gets batches of HALF samples from the
DistributedSampler Lightning puts in (``global_batches`` gives the global batch of every step).
"""

import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from layout import use_test_dirs  # noqa: E402

use_test_dirs()  # the test module this worker shares its set-up with lives in a test folder

import lightning as L  # noqa: E402
import torch  # noqa: E402

from cockpit_lite.integrations.lightning import CockpitCallback  # noqa: E402
from test_integration_lightning import QUANTITIES, data, fresh_module  # noqa: E402

HALF = 8
STEPS = 3


def global_batches(x, y):
    """The global batch of each step: the two processes' batches, concatenated. Lightning's
    DistributedSampler shuffles (seed 0, epoch 0: the order of ``randperm`` with a generator seeded 0)
    and deals the permutation out in turn (process r takes positions r, r + 2, ...)."""
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    shards = [order[r::2] for r in range(2)]
    for k in range(STEPS):
        idx = torch.cat([s[k * HALF:(k + 1) * HALF] for s in shards])
        yield x[idx], y[idx]


def main(logdir: str) -> None:
    torch.set_num_threads(1)
    x, y = data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=HALF, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS, logger=False,
                        callbacks=[CockpitCallback(quantities=QUANTITIES, logdir=logdir)],
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        default_root_dir=os.path.dirname(logdir), num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|LeafSpec).*")
        trainer.fit(fresh_module(), loader)


if __name__ == "__main__":
    main(sys.argv[1])
