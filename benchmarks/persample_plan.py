"""Per-sample plan (issue 21 items 1, 3): the same per-sample set in two orders, side by side.

    OMP_NUM_THREADS=1 python benchmarks/persample_plan.py [--rounds 5] [--steps 3] [--problem cnn]

Variants, interleaved in one process (benchmarks/timing.py), every quantity tracked every step, median
over rounds of the ratio to a plain step of the same round:

* ``hist_first``:  grad_hist_1d, norm_test, inner_test, ortho_test, mean_gsnr
* ``noise_first``: norm_test, inner_test, ortho_test, mean_gsnr, grad_hist_1d
* ``economy``:     the economy preset, every quantity every step (alpha's projections from the step's
  pass: at t+1 in it, at t from the conv blocks it kept)
* ``economy_unfused``: the same, alpha's projections (at t after the step, at t+1 onto d_t) computed
  apart: its own route per layer, as before the plan took them

Before the per-step plan (``cockpit_lite/persample/plan.py``) the first order built the conv layers'
per-sample gradients twice (3.43x vs 2.62x in issue 21). With the plan both orders cost the same.
Also prints the peak RSS of the process (Linux ru_maxrss; coarse) and the largest relative difference
between the two orders' logged values, and between economy and economy_unfused (they must agree to
1e-5; clocks left out).
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import problems, timing  # noqa: E402

SET = ["grad_hist_1d", "norm_test", "inner_test", "ortho_test", "mean_gsnr"]
ORDERS = {"hist_first": SET, "noise_first": SET[1:] + SET[:1]}


def economy():
    from cockpit_lite.presets import preset

    return preset("economy", schedule="every")


def _without_direction(step):
    """The step with alpha's projections taken apart from the shared pass (as before the plan took
    them): its ``per_sample_direction`` says None and ``per_sample_keep`` False while this variant runs."""
    from cockpit_lite.quantities.alpha import Alpha

    def run():
        planned = getattr(Alpha, "per_sample_direction", None)
        keep = getattr(Alpha, "per_sample_keep", None)
        if planned is None or keep is None:  # a version without them (the comparison with main)
            return step()
        Alpha.per_sample_direction = lambda self, step: None
        Alpha.per_sample_keep = lambda self, step: False
        try:
            step()
        finally:
            Alpha.per_sample_direction, Alpha.per_sample_keep = planned, keep
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--problem", default="cnn")
    args = ap.parse_args(argv)
    problem = problems.get(args.problem)
    with tempfile.TemporaryDirectory() as tmp:
        variants, cockpits = {}, {}
        variants["plain"], _, _ = problems.training_step(problem, momentum=0.0)
        for name, qs in list(ORDERS.items()) + [("economy", economy()), ("economy_unfused", economy())]:
            variants[name], cockpits[name], _ = problems.training_step(
                problem, qs, os.path.join(tmp, name), momentum=0.0)
        variants["economy_unfused"] = _without_direction(variants["economy_unfused"])
        per_round = timing.interleaved(variants, rounds=args.rounds, steps=args.steps, warmup=2)
        logs = {}
        for name, cp in cockpits.items():
            cp.close()
            logs[name] = cp.log_path
        med, rat = timing.medians(per_round), timing.ratios(per_round)
        print(f"problem {args.problem}, rounds {args.rounds} x {args.steps} steps, medians")
        for name in variants:
            print(f"  {name:16s} {med[name] * 1e3:8.1f} ms/step  {rat[name]:5.2f}x plain")
        print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (whole process)")
        diff = _compare(logs["hist_first"], logs["noise_first"])
        print(f"  largest relative difference between the orders' logged values: {diff:.2e}")
        diff = _compare(logs["economy"], logs["economy_unfused"])
        print(f"  largest relative difference, economy fused vs unfused: {diff:.2e}")


def _compare(a, b) -> float:
    """Largest |x - y| / max(1, |x|) over the numbers of the two logs (same steps, same keys)."""
    ra, rb = _records(a), _records(b)
    worst = 0.0
    for ka, x in ra.items():
        y = rb.get(ka)
        if y is None or (math.isnan(x) and math.isnan(y)):
            continue
        worst = max(worst, abs(x - y) / max(1.0, abs(x)))
    return worst


def _records(path):
    import json

    out = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            step = rec.get("step")
            _flatten(out, (step,), rec)
    return out


def _flatten(out, prefix, v):
    if isinstance(v, dict):
        for k, x in v.items():
            _flatten(out, prefix + (k,), x)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _flatten(out, prefix + (i,), x)
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
        if not any(isinstance(k, str) and ("time" in k or k == "wall") for k in prefix[1:]):  # clocks differ
            out[prefix] = float(v)


if __name__ == "__main__":
    main()
