"""A floor under issue 21's default-schedule targets on large conv nets: the 1D histogram of the per-sample
gradient elements has to touch each of the B x P elements once per per-sample step, however it is computed.

Times, side by side in one process (medians of ``--rounds``): a plain training step of the problem, and
counting a histogram of B x P float32 values (random, drawn once; per parameter as the quantity does:
``persample/samples.py``'s ``_histc``, max |g| and the counts). No per-sample gradients are built, so
this is below what any implementation of ``grad_hist_1d`` costs. With the economy preset's schedules
(per-sample quantities every 10 steps), the histogram alone adds ``count / plain / 10`` to the average step.

    python benchmarks/hist_floor.py [--problem resnet18_gn] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    from benchmarks import problems
    from cockpit_lite.persample.samples import _histc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", default="resnet18_gn")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    problem = problems.get(args.problem)
    step, _, model = problems.training_step(problem)
    b = problem.batch_size
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(b, *q.shape, generator=g) * 1e-3 for q in model.parameters()]
    elements = sum(x.numel() for x in blocks)
    R = 1.05 * max(float(x.abs().max()) for x in blocks)  # the range covers every value (no clipping pass)
    step()
    plain, count = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        for x in blocks:
            _histc(x, R, 100)
        count.append(time.perf_counter() - t)
    result = {"problem": args.problem, "batch": b, "elements_million": round(elements / 1e6, 1),
              "plain_ms": round(statistics.median(plain) * 1e3, 1), "count_ms": round(statistics.median(count) * 1e3, 1)}
    result["count_x_plain"] = round(result["count_ms"] / result["plain_ms"], 2)
    result["added_per_step_every_10"] = round(result["count_x_plain"] / 10, 3)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
