"""One problem and optimizer: time per step and peak memory of every variant against the plain loop.

Time: every variant is timed interleaved with the plain loop in this process (benchmarks/timing.py),
ratio per round, median over rounds. Memory: all variants in one fresh subprocess
(benchmarks/memory.py), each against the plain loop measured right before it. Notes: which tracked
quantities came out NaN, with the first reason from the run log (e.g. BatchNorm in training mode).

"""

from __future__ import annotations

import statistics
import tempfile
from typing import Dict, List, Optional

import cockpit_lite
from benchmarks import floors, memory, problems, timing
from benchmarks.variants import TARGET_ISSUE, TARGETS, Variant


def nan_quantities(run, spec):
    """{tracked quantity logged as not computable: the first reason given} from a run log."""
    failed = {}
    for name in spec:
        reasons = run.reasons(name)
        if reasons:
            failed[name] = next(iter(reasons.values()))
    return failed


def measure(problem: problems.Problem, optimizer: str, specs: Dict[str, Variant], rounds: int, steps: int,
            tmp: str, memory_steps: Optional[int] = None) -> List[dict]:
    """One row per variant; ``memory_steps`` None: no memory measurement."""
    steppers, cockpits = {}, {}
    steppers["plain"], _, _ = problems.training_step(problem, optimizer=optimizer)
    for name, (spec, start, _) in specs.items():
        logdir = tempfile.mkdtemp(prefix=f"{problem.name}-{optimizer}-", dir=tmp)
        steppers[name], cockpits[name], _ = problems.training_step(problem, spec, logdir, optimizer=optimizer)
        cockpits[name].step = start  # the schedules depend only on the step index
    floor_steppers = {}  # issue 21's rows: their hand-written floor, timed in the same rounds (floors.py)
    for name in specs:
        make = floors.floor_for(problem.name, name) if TARGET_ISSUE.get((problem.name, name)) else None
        if make is not None:
            floor_steppers[name] = steppers[f"floor: {name}"] = make(problem, optimizer, tmp)
    per_round = timing.interleaved(steppers, rounds=rounds, steps=steps, warmup=1)
    for f in floor_steppers.values():
        f.close()
    ratios, med = timing.ratios(per_round), timing.medians(per_round)
    mem = {}
    if memory_steps:
        mem = memory.measure(problem.spec, optimizer, {n: (spec, start, memory_steps) for n, (spec, start, _) in specs.items()})
    rows = []
    for name, (spec, start, what) in specs.items():
        cockpits[name].close()
        run = cockpit_lite.load(cockpits[name].logdir)
        _, hvps = run.series("hess_max_ev/hvps")
        target = TARGETS.get((problem.name, name))
        spread = [t / b for t, b in zip(per_round[name], per_round["plain"])]
        rows.append({
            "problem": problem.name, "optimizer": optimizer, "variant": name, "what": what,
            "plain_ms": med["plain"] * 1e3, "ms": med[name] * 1e3, "ratio": ratios[name],
            "ratio_spread": [min(spread), max(spread)], "rounds": rounds, "steps": steps,
            "target": target, "target_issue": TARGET_ISSUE.get((problem.name, name)),
            "met": (ratios[name] <= target) if target else None,
            "hvps_per_step": float(statistics.mean(hvps)) if len(hvps) else None,
            "floor_ratio": ratios.get(f"floor: {name}"),
            "memory": mem.get(name),
        })
        rows[-1]["reason_by_quantity"] = nan_quantities(run, spec)
        rows[-1]["nan"] = sorted(rows[-1]["reason_by_quantity"])
    return rows
