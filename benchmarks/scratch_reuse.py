"""The per-sample pass with its scratch memory reused (persample/scratch.py) and allocated afresh, side by side.

    python benchmarks/scratch_reuse.py [--problems resnet18_gn,cnn,transformer4] [--rounds 5] [--steps 2]

Variants, interleaved in one process (benchmarks/timing.py), median over rounds of the ratio to a plain step
of the same round: ``plain``; ``economy``, the economy preset with every quantity every step (the per-sample
pass on every step), scratch reused; ``economy_fresh``, the same with ``scratch.ENABLED`` off while it runs
(every per-sample block and the histogram's buffers allocated afresh, as before). Also the minor page faults
per step of each variant (Linux ``ru_minflt``), and the largest relative difference between the two economy
variants' logged values (the same arithmetic: 0 expected, clocks left out).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import problems, timing  # noqa: E402
from benchmarks.persample_plan import _compare  # noqa: E402
from cockpit_lite.persample import scratch  # noqa: E402
from cockpit_lite.presets import preset  # noqa: E402


def _fresh(step):
    def run():
        scratch.ENABLED = False
        try:
            step()
        finally:
            scratch.ENABLED = True
    return run


def _faults(step):
    """The step, adding its minor page faults to ``run.faults``."""
    def run():
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        run.faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    run.faults = []
    return run


def measure(name: str, rounds: int, steps: int, tmp: str) -> str:
    problem = problems.get(name)
    variants, cockpits = {}, {}
    variants["plain"], _, _ = problems.training_step(problem, momentum=0.0)
    for v in ("economy", "economy_fresh"):
        variants[v], cockpits[v], _ = problems.training_step(problem, preset("economy", "every"),
                                                             os.path.join(tmp, f"{name}-{v}"), momentum=0.0)
    variants["economy_fresh"] = _fresh(variants["economy_fresh"])
    variants = {k: _faults(fn) for k, fn in variants.items()}
    per_round = timing.interleaved(variants, rounds=rounds, steps=steps, warmup=2)
    logs = {}
    for v, cp in cockpits.items():
        cp.close()
        logs[v] = cp.log_path
    med, rat = timing.medians(per_round), timing.ratios(per_round)
    rows = []
    for v, fn in variants.items():
        faults = sorted(fn.faults[2:])  # after the warm-up
        rows.append(f"| {name} | {v} | {med[v] * 1e3:.1f} | {rat[v]:.2f}x | {faults[len(faults) // 2]} |")
    diff = _compare(logs["economy"], logs["economy_fresh"])
    rows.append(f"| {name} | largest relative difference of the logged values | | {diff:.1e} | |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", default="resnet18_gn,cnn,transformer4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    print(f"rounds {args.rounds} x {args.steps} steps, medians")
    print("| problem | variant | ms/step | x plain | page faults/step (median) |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.problems.split(","):
            print(measure(name, args.rounds, args.steps, tmp), flush=True)


if __name__ == "__main__":
    main()
