"""Stage ``timing``: the presets' cost on the GPU, side by side with Cockpit, and the GPU block of
docs/benchmarks.md.

Per problem (MLP, CNN, a larger CNN, a larger transformer; SGD with momentum), interleaved with the
plain loop in one process (benchmarks/suite.py, benchmarks/timing.py: the clock is read after
``torch.cuda.synchronize``, ratio to the plain step per round, median over rounds):

* ``default`` (the default preset as shipped: first-order quantities, every step), ``economy (every
  step)``, ``full (every step)``;
* ``economy (default schedules)``, ``full (default schedules)``: as shipped, from step 1000 on, timed
  in blocks of whole per-sample periods (10 steps), so tracked and untracked steps mix as in a run.

Issue 23's targets (``TARGETS``), judged on the median ratio: on the CNN, economy every step <= 1.2x,
full every step <= 3x; default schedules (the presets as shipped) <= 1.03x. Then Cockpit and
cockpit-lite on the same quantities (benchmarks/cockpit_side.py) when cockpit-for-pytorch imports.

Rows are written to ``timing.json`` after every problem, so a stage stopped by its time limit still
leaves the problems it finished; ``block`` turns them into the markdown of the GPU block.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from typing import List

from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import cockpit_side, report, suite  # noqa: E402
from benchmarks import gpu_common as gc_  # noqa: E402
from benchmarks import problems  # noqa: E402
from benchmarks.variants import STEADY_STATE  # noqa: E402
from cockpit_lite import presets  # noqa: E402

PROBLEMS = "mlp,cnn,cnn_large,transformer_large"
# issue 23's targets on the GPU: (problem, variant) -> largest acceptable median ratio
TARGETS = {("cnn", "economy (every step)"): 1.2, ("cnn", "full (every step)"): 3.0}
SCHEDULED_TARGET = 1.03  # every problem, the presets as shipped
COCKPIT_ON = ("mlp", "cnn")


def cnn_large() -> nn.Module:
    """Wider and deeper than ``cnn``: 64-128-256 channels, two convs per stage, 32x32x3 inputs."""
    def stage(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*stage(3, 64), *stage(64, 128), *stage(128, 256), nn.Flatten(),
                         nn.Linear(256 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, 10))


def register_large_problems() -> None:
    """Add ``cnn_large`` (batch 256) and ``transformer_large`` (width 512, 4 layers, batch 16) to
    benchmarks/problems.py's table for this process."""
    base_cnn, base_tf = problems.PROBLEMS["cnn"], problems.PROBLEMS["transformer"]
    problems.PROBLEMS.setdefault("cnn_large", dataclasses.replace(base_cnn, name="cnn_large", make_model=cnn_large,
                                                                  batch_size=256))
    problems.PROBLEMS.setdefault("transformer_large", dataclasses.replace(
        base_tf, name="transformer_large", make_model=lambda: problems.Transformer(width=512, layers=4, heads=8),
        batch_size=16))


def specs(tiny: bool):
    every = {"default": (presets.preset("default"), 0, "the default preset as shipped (first-order, every step)")}
    for name in ("economy", "full"):
        every[f"{name} (every step)"] = (presets.preset(name, "every"), 0, f"the {name} preset, every quantity every step")
    scheduled = {f"{name} (default schedules)": (presets.preset(name), STEADY_STATE,
                                                 f"the {name} preset as shipped, from step {STEADY_STATE} on")
                 for name in ("economy", "full")}
    return every, scheduled


def target_of(problem: str, variant: str):
    if variant == "default" or variant.endswith("(default schedules)"):
        return SCHEDULED_TARGET
    return TARGETS.get((problem, variant))


def measure_problem(name: str, rounds: int, steps: int, tmp: str, tiny: bool) -> List[dict]:
    problem = problems.get(name)
    if tiny:
        problem = dataclasses.replace(problem, batch_size=min(problem.batch_size, 8))
    every, scheduled = specs(tiny)
    block = presets.PER_SAMPLE_EVERY
    rows = suite.measure(problem, "sgd", every, rounds, steps, tmp) + suite.measure(problem, "sgd", scheduled, rounds, block, tmp)
    for r in rows:
        r["target"] = target_of(name, r["variant"])
        r["met"] = (r["ratio"] <= r["target"]) if r["target"] else None
    return rows


def run(device: str, tiny: bool, out: str, problem_names: str = PROBLEMS) -> dict:
    cuda = gc_.cuda_ok(device)
    target = device if cuda else "cpu"
    problems.set_device(target)
    register_large_problems()
    rounds, steps = (1, 1) if tiny else (5, 3)
    names = ["mlp"] if tiny else problem_names.split(",")
    state = {"device": target, "dry_run": not cuda, "rounds": rounds, "steps": steps, "rows": [], "cockpit": None, "planned": names,
             "done": [], "started": time.time()}
    path = os.path.join(out, "timing.json")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            gc_.say(f"timing: {name}")
            try:
                state["rows"] += measure_problem(name, rounds, steps, tmp, tiny)
                state["done"].append(name)
            except Exception as err:
                state.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"
            gc_.write_json(path, state)
        gc_.say("timing: side by side with Cockpit")
        try:
            if tiny:
                state["cockpit"] = "not run in --tiny"
            else:
                state["cockpit"] = cockpit_side.measure([p for p in COCKPIT_ON if p in names], rounds, steps, tmp,
                                                        curvature=("mlp",))
        except Exception as err:
            state["cockpit"] = f"failed: {type(err).__name__}: {err}"
    state["elapsed_s"] = time.time() - state["started"]
    gc_.write_json(path, state)
    return summarize(state, device)


def summarize(state: dict, device: str) -> dict:
    checks = []
    dry = state.get("dry_run", True)
    for r in state["rows"]:
        if not r.get("target"):
            continue
        detail = f"{r['problem']}: {r['ms']:.2f} ms vs plain {r['plain_ms']:.2f} ms = {r['ratio']:.3f}x (target <= {r['target']}x)"
        status = gc_.SKIPPED if dry else gc_.passed(r["met"])
        checks.append(gc_.check(f"time {r['problem']} {r['variant']}", status,
                                detail + (f" ({gc_.no_cuda_reason(device)})" if dry else ""), ratio=r["ratio"]))
    for name, err in (state.get("errors") or {}).items():
        checks.append(gc_.check(f"time {name}", gc_.FAIL, f"raised {err}"))
    if isinstance(state.get("cockpit"), str):
        checks.append(gc_.check("side by side with Cockpit", gc_.SKIPPED, state["cockpit"]))
    return gc_.stage_result("timing", checks, {"problems_done": state.get("done", []), "elapsed_s": state.get("elapsed_s")})


def block(state: dict, meta: dict, command: str) -> str:
    """The markdown of docs/benchmarks.md's GPU block from the timing rows (partial ones say so)."""
    rows = state.get("rows") or []
    elapsed = state.get("elapsed_s") or (time.time() - state.get("started", time.time()))
    parts = []
    if state.get("dry_run"):
        parts.append("**Dry run on the CPU (no CUDA device): not GPU figures; do not paste into docs/benchmarks.md.**\n")
    parts += [report.header(meta, command, elapsed), ""]
    if not rows:
        parts.append("No timing rows: the stage did not finish any problem (see the check's log).")
        return "\n".join(parts)
    parts += ["Against issue 23's targets (economy every step <= 1.2x and full every step <= 3x on the CNN; the presets "
              "as shipped <= 1.03x everywhere):", "", report.targets_table(rows), "",
              "Time per step, ratio to the plain step (columns: problem and optimizer):", "", report.time_pivot(rows)]
    note = report.notes(rows)
    if note:
        parts += ["", note]
    described = {r["variant"]: (None, None, r["what"]) for r in rows}
    parts += ["", "Variants (rows): " + "; ".join(f"`{n}`: {w}" for n, (_, _, w) in described.items()) +
              f". The default-schedule variants are timed in blocks of whole per-sample periods "
              f"({presets.PER_SAMPLE_EVERY} steps). Problems: {', '.join(dict.fromkeys(r['problem'] for r in rows))} "
              "(benchmarks/problems.py; cnn_large and transformer_large: benchmarks/gpu_timing.py); SGD with momentum; "
              "torch's default TF32 settings (off in matrix products, on in cuDNN convolutions); peak memory not measured in this run."]
    missing = [p for p in state.get("planned", []) if p not in state.get("done", [])]
    if missing:
        parts += ["", f"Not measured (the stage ran out of time or failed): {', '.join(missing)}."]
    if state.get("cockpit") is not None:
        parts += ["", report.cockpit_tables(state["cockpit"])]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=".")
    ap.add_argument("--problems", default=PROBLEMS)
    args = ap.parse_args(argv)
    print(run(args.device, args.tiny, args.out, args.problems))


if __name__ == "__main__":
    main()
