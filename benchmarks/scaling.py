"""How the overhead scales: ratio to the plain step vs batch size and vs width, and peak memory vs
batch size, for one fixed set of quantities (``SET``: the gradient-noise set and alpha, every step).

    python benchmarks/scaling.py [--problem mlp] [--batches 32,64,128,256,512,1024] [--widths 128,256,512,1024]

Each point is its own interleaved timing of the plain loop and the watched loop (benchmarks/timing.py,
median of per-round ratios); widths are the MLP's hidden sizes (784-h-h/2-10, batch 128). Peak memory
per batch size comes from benchmarks/memory.py (fresh subprocess, plain loop measured right before).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import List

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import memory, problems, timing  # noqa: E402

SET = ("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr", "alpha")
SPEC = {n: "every" for n in SET}
BATCHES = (32, 64, 128, 256, 512, 1024)
WIDTHS = (128, 256, 512, 1024)


def point(problem, rounds, steps, tmp, with_memory) -> dict:
    plain, _, _ = problems.training_step(problem)
    watched, cockpit, _ = problems.training_step(problem, SPEC, os.path.join(tmp, problem.name))
    per_round = timing.interleaved({"plain": plain, "watched": watched}, rounds=rounds, steps=steps, warmup=1)
    cockpit.close()
    med, rat = timing.medians(per_round), timing.ratios(per_round)
    row = {"problem": problem.name, "batch_size": problem.batch_size, "hidden": problem.spec.get("hidden"),
           "plain_ms": med["plain"] * 1e3, "ms": med["watched"] * 1e3, "ratio": rat["watched"]}
    if with_memory:
        row["memory"] = memory.measure(problem.spec, "sgd", {"set": (SPEC, 0, 2)})["set"]
    return row


def measure(problem_name: str, rounds: int, steps: int, tmp: str, batches=BATCHES, widths=WIDTHS,
            with_memory: bool = True) -> List[dict]:
    """Rows of the batch sweep (kind "batch", with memory) and, for the MLP, the width sweep (kind "width")."""
    rows = []
    for b in batches:
        rows.append(dict(point(problems.make(problem_name, batch_size=b), rounds, steps, tmp, with_memory), kind="batch"))
    if problem_name == "mlp":
        for h in widths:
            rows.append(dict(point(problems.make("mlp", hidden=h), rounds, steps, tmp, False), kind="width"))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", default="mlp")
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args(argv)
    from benchmarks import report
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(args.problem, args.rounds, args.steps, tmp, [int(b) for b in args.batches.split(",")],
                       [int(w) for w in args.widths.split(",")], not args.no_memory)
    print(report.scaling_tables(rows))


if __name__ == "__main__":
    main()
