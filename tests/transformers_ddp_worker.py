"""The Hugging Face Trainer data-parallel run of tests/integrations/test_integration_transformers.py: two CPU
processes (gloo), started by torchrun, each with a CockpitTrainerCallback.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/transformers_ddp_worker.py OUTDIR

Each process saves the inputs and labels its model saw on every step (OUTDIR/batches-<rank>.pt), so
the test rebuilds the global batches (process 0's shard, then process 1's) whatever order the
Trainer's sampler dealt them in.
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]
from layout import use_test_dirs  # noqa: E402

use_test_dirs()  # the test module this worker shares its set-up with lives in a test folder

import torch  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from cockpit_lite.integrations.transformers import CockpitTrainerCallback  # noqa: E402
from test_integration_transformers import BATCH, QUANTITIES, Samples, fresh_model, optimizer_and_schedule  # noqa: E402

STEPS = 3


def main(outdir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    model = fresh_model()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append((kwargs["x"].clone(), kwargs["labels"].clone())),
                                    with_kwargs=True)
    args = TrainingArguments(output_dir=outdir, use_cpu=True, ddp_backend="gloo", report_to=[], max_steps=STEPS,
                             per_device_train_batch_size=BATCH, max_grad_norm=0.0, seed=0, dataloader_num_workers=0,
                             train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Samples(), optimizers=optimizer_and_schedule(model),
                      callbacks=[CockpitTrainerCallback(quantities=QUANTITIES, logdir=os.path.join(outdir, "cockpit"))])
    trainer.train()
    torch.save(seen, os.path.join(outdir, f"batches-{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
