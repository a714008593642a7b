"""Benchmark runner: per-step time and peak memory of cockpit-lite's quantities and presets against a
plain step, side by side with Cockpit, and how the overhead scales.

    python benchmarks/run.py --quick                  # aimed at under 10 minutes on a quiet 2-core machine
    python benchmarks/run.py                          # everything, more rounds (about 1.5 hours here)
    python benchmarks/run.py --quick --update-readme  # also rewrite the generated block in docs/benchmarks.md
    python benchmarks/run.py --smoke --out /tmp/bench # 1 round x 2 steps: checks that everything runs
    python benchmarks/run.py --quick --device cuda --update-readme  # on a GPU: its own block there

``--device`` (default ``auto``: the GPU when torch sees one) runs every problem there; CUDA timings read
the clock after ``torch.cuda.synchronize``, and peak memory is CUDA's allocator peak. A GPU run writes
``--out``-gpu files and the GPU block of docs/benchmarks.md, so CPU and GPU figures stand side by side.

Sections (each can be switched on or off; ``--quick`` and the full run differ in what is on):

* overhead: for each problem (benchmarks/problems.py) and optimizer, every variant
  (benchmarks/variants.py: every quantity alone, the presets every step and with their default
  schedules, the issues' sets) timed interleaved with the plain loop in one process
  (benchmarks/timing.py, ratio per round, median over rounds), and with ``--memory`` its peak memory
  (benchmarks/memory.py); ``--alone mlp`` (the quick default) times the quantities alone on the MLP
  with SGD only (``all``: every problem and optimizer, ``sgd``: every problem with SGD),
  ``--curvature mlp`` (the quick default) times curvature on every step on the MLP only (plus the rows
  with an issue's target: hess_max_ev, full-like on the CNN), as it costs 1-5 s per step elsewhere;
  ``--adam-on mlp,cnn`` (the quick default) times the second optimizer on those problems only;
  the issues' sets (noise, noise+hist, alpha) are timed on mlp and cnn only in ``--quick`` (the presets
  everywhere);
* ``--cockpit``: Cockpit and cockpit-lite on the same quantities (benchmarks/cockpit_side.py);
* ``--scaling``: overhead vs batch size and width, peak memory vs batch size (benchmarks/scaling.py).

Results go to ``--out``.md (all tables, with the machine and the command) and ``--out``.json; the
tables also print. Targets are the issues'; "met" is judged on the median ratio. The elapsed time of
every section and the total print at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import cockpit_side, report, scaling, suite, variants  # noqa: E402
from benchmarks import problems as problem_set  # noqa: E402
from cockpit_lite import presets  # noqa: E402

PROBLEMS = "mlp,cnn,transformer,transformer4,resnet_bn_eval,resnet_bn_train,resnet18_gn"
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (rounds, steps per round) of the every-step variants, blocks of per-sample periods for the scheduled
# ones, steps per memory measurement, cockpit timing (rounds, steps), scaling timing (rounds, steps)
SETTINGS = {
    "full": dict(rounds=5, steps=3, periods=2, memory_steps=3, cockpit=(5, 3), scaling=(5, 3),
                 batches=scaling.BATCHES, widths=scaling.WIDTHS, scaling_problems="mlp,cnn", alone="all",
                 cockpit_curvature="mlp,cnn", curvature="all", adam_on="all", sets_on="all"),
    "quick": dict(rounds=3, steps=1, periods=1, memory_steps=2, cockpit=(3, 1), scaling=(3, 2),
                  batches=scaling.BATCHES, widths=scaling.WIDTHS, scaling_problems="mlp", alone="mlp",
                  cockpit_curvature="mlp", curvature="mlp", adam_on="mlp,cnn", sets_on="mlp,cnn"),
    "smoke": dict(rounds=1, steps=2, periods=0, memory_steps=2, cockpit=(1, 1), scaling=(1, 2),
                  batches=(32, 64), widths=(128,), scaling_problems="mlp", alone="all", cockpit_curvature="",
                  curvature="mlp", adam_on="all", sets_on="all"),
}


def machine(device: str = "cpu"):
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(torch.device(device) if device.startswith("cuda") else 0) \
        if torch.cuda.is_available() else "no GPU"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(), "device": device,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _on(setting: str, problem: str) -> bool:
    """A setting naming problems ("mlp,cnn") or "all" applies to ``problem``."""
    return setting == "all" or problem in setting.split(",")


def overhead(problem_names, optimizers, s, with_memory, tmp, log):
    rows = []
    for p in problem_names:
        problem = problem_set.get(p)
        for opt in optimizers:
            if opt != optimizers[0] and not _on(s["adam_on"], p):
                continue
            alone = s["alone"] == "all" or (opt == "sgd" and (s["alone"] == "sgd" or _on(s["alone"], p)))
            curvature = _on(s["curvature"], p)
            rows += suite.measure(problem, opt, variants.every_step(p, opt, alone, curvature, _on(s["sets_on"], p)), s["rounds"], s["steps"], tmp,
                                  s["memory_steps"] if with_memory else None)
            # blocks of whole per-sample periods, so tracked and untracked steps mix as in a run
            block = max(1, s["periods"]) * presets.PER_SAMPLE_EVERY if s["periods"] else s["steps"]
            # memory: the first steps from STEADY_STATE on, which include a per-sample step (its peak)
            rows += suite.measure(problem, opt, variants.scheduled(), s["rounds"], block, tmp,
                                  s["memory_steps"] if with_memory else None)
            log(f"overhead {p}/{opt}")
    return rows


def tables(result, meta, command, elapsed, s):
    rows = result["overhead"]
    described = dict(variants.preset_sets("sgd"), **variants.scheduled())
    parts = [report.header(meta, command, elapsed), "",
             "Against the issues' targets:", "", report.targets_table(rows), "",
             "Time per step, ratio to the plain step (columns: problem and optimizer):", "", report.time_pivot(rows)]
    if any(r.get("memory") for r in rows):
        parts += ["", "Peak memory, MB (x the plain loop's):", "", report.memory_pivot(rows)]
    note = report.notes(rows)
    if note:
        parts += ["", note]
    parts += ["", report.legend(described, presets.PER_SAMPLE_EVERY, s["alone"], s["curvature"], s["adam_on"], s["sets_on"])]
    if result.get("cockpit") is not None:
        parts += ["", report.cockpit_tables(result["cockpit"])]
    if result.get("scaling"):
        parts += ["", report.scaling_tables(result["scaling"])]
    block = "\n".join(parts)
    return block, block + "\n\nEvery row:\n\n" + report.full_table(rows)


def update_readme(table, path="docs/benchmarks.md", block="benchmarks"):
    """Replace the generated block ``block`` ("benchmarks": CPU figures, "benchmarks-gpu": GPU figures)."""
    start, end = f"<!-- {block}:start (generated by benchmarks/run.py) -->", f"<!-- {block}:end -->"
    with open(path) as fh:
        text = fh.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as fh:
        fh.write(head + start + "\n" + table + "\n" + end + tail)


def _switch(ap, name, help_):
    ap.add_argument(f"--{name}", dest=name, action="store_true", default=None, help=help_)
    ap.add_argument(f"--no-{name}", dest=name, action="store_false")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer rounds and sections (under 10 min here)")
    mode.add_argument("--smoke", action="store_true", help="1 round x 2 steps everywhere: checks that it all runs")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--problems", default=PROBLEMS)
    ap.add_argument("--optimizers", default="sgd,adam")
    ap.add_argument("--alone", help="time every quantity alone: 'all', 'sgd' (every problem with SGD), 'none', "
                                    "or problems (with SGD)")
    ap.add_argument("--adam-on", dest="adam_on", help="problems (or 'all') also timed with the second optimizer")
    ap.add_argument("--curvature", help="problems (or 'all') on which curvature is also timed on every step")
    _switch(ap, "memory", "peak memory of every variant (default: on)")
    _switch(ap, "cockpit", "side by side with Cockpit on mlp and cnn (default: on)")
    _switch(ap, "scaling", "overhead vs batch size and width (default: on)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="writes OUT.md and OUT.json (default benchmarks/results)")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (the GPU when there is one)")
    args = ap.parse_args(argv)
    device = problem_set.set_device(args.device)
    gpu = problem_set.on_gpu()
    if gpu and args.out == DEFAULT_OUT:
        args.out += "-gpu"
    s = dict(SETTINGS["smoke" if args.smoke else "quick" if args.quick else "full"])
    s.update({k: v for k, v in (("rounds", args.rounds), ("steps", args.steps), ("alone", args.alone),
                                             ("curvature", args.curvature), ("adam_on", args.adam_on)) if v})
    command = ("python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    on = {k: True if getattr(args, k) is None else getattr(args, k) for k in ("memory", "cockpit", "scaling")}
    problem_names = args.problems.split(",")
    for p in problem_names:
        problem_set.get(p)  # unknown names fail here, not after an hour
    t0 = time.time()
    elapsed = []

    def log(what):
        elapsed.append((what, time.time() - t0))
        print(f"{what} done ({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)

    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        result["overhead"] = overhead(problem_names, args.optimizers.split(","), s, on["memory"], tmp, log)
        if on["cockpit"]:
            sides = [p for p in ("mlp", "cnn") if p in problem_names] or ["mlp"]
            result["cockpit"] = cockpit_side.measure(sides, *s["cockpit"], tmp, s["cockpit_curvature"].split(","))
            log("cockpit")
        if on["scaling"]:
            result["scaling"] = []
            for p in s["scaling_problems"].split(","):
                result["scaling"] += scaling.measure(p, *s["scaling"], tmp, s["batches"], s["widths"], on["memory"])
                log(f"scaling {p}")
    meta = machine(device)
    total = time.time() - t0
    block, everything = tables(result, meta, command, total, s)
    print(everything)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write(everything + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"machine": meta, "command": command, "settings": s, "elapsed_s": dict(elapsed, total=total),
                   **result}, fh, indent=1, default=str)
    if args.update_readme:
        update_readme(block, block="benchmarks-gpu" if gpu else "benchmarks")
    print(f"total {total:.0f} s ({total / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
