"""The one-shot GPU check (issue 23): every stage in order, each in its own process with its own time
limit, and one summary with PASS / FAIL / SKIPPED per check and every figure.

    bash benchmarks/gpu_check.sh                      # on a GPU machine: everything, ~6-8 minutes
    bash benchmarks/gpu_check.sh --device cpu --tiny  # here: the same pipeline on the CPU in ~1 minute
    python benchmarks/gpu_check.py --apply-block gpu_out/gpu_block.md  # paste the GPU block into docs/benchmarks.md

Stages (cheapest and most informative first; docs/gpu-check.md says what each checks):

==========  ======================================================================  =======
env         torch, CUDA, the GPU, the driver, which optional packages are there     gpu_check.py
values      CPU vs CUDA: every logged value of the demo and a transformer, full     gpu_values.py
syncs       no host sync on untracked steps (sync debug mode and the profiler)      gpu_syncs.py
energy      NVML energy per step vs the counter read directly; labels, windows      gpu_energy.py
cuda_tests  the test suite's CUDA tests (the test files that ask for a GPU)         pytest
timing      plain / default / economy / full, every step and as shipped; Cockpit    gpu_timing.py
==========  ======================================================================  =======

Outputs in ``--out`` (``$OUT`` when set, else ./gpu_out), at most 8 files: summary.json, summary.md,
gpu_block.md (docs/benchmarks.md's GPU block), values.json, timing.json, pytest_cuda.log, and
gpu_check.log (written by gpu_check.sh: everything printed). A stage that fails, hangs past its limit
or crashes CUDA is reported as FAIL with the reason, and the next stage runs.
"""

from __future__ import annotations

import argparse
import glob
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_common as gc_  # noqa: E402

# name -> (module that runs it, or None: this file; time limit in s on a GPU)
STAGES = {
    "env": (None, 60),
    "values": ("benchmarks.gpu_values", 120),
    "syncs": ("benchmarks.gpu_syncs", 60),
    "energy": ("benchmarks.gpu_energy", 60),
    "cuda_tests": (None, 120),
    "timing": ("benchmarks.gpu_timing", 240),
}
# a dry run off the GPU times nothing: its stages may take their GPU limit several times over on a busy 2-core
# machine (the syncs stage: 7.6 s when quiet, past 60 s in a CI run beside other tests), so they get this factor
CPU_SLACK = 4
# optional package -> what is lost without it
PACKAGES = {
    "pynvml": "nvidia-ml-py: no NVML energy counter (energy stage fails, energy/gpu0 unavailable)",
    "backpack": "backpack-for-pytorch: exact Hessian/GGN diagonals fall back to Hutchinson estimates",
    "cockpit": "cockpit-for-pytorch: no side-by-side timing with Cockpit",
    "sklearn": "scikit-learn: the demo trains on random images instead of the digits",
    "transformers": "transformers: the Hugging Face integration tests skip",
    "pytest": "pytest: the CUDA tests cannot run",
}


# -- stages that live here ------------------------------------------------------------------------
def stage_env(device: str, tiny: bool, out: str) -> dict:
    import torch

    figures = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda_build": torch.version.cuda,
               "cuda_available": torch.cuda.is_available(), "cockpit_lite": _origin("cockpit_lite")}
    checks = []
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        figures.update(gpu=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                       multiprocessors=p.multi_processor_count, devices=torch.cuda.device_count())
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            figures["nvidia_smi"] = subprocess.run([smi, "--query-gpu=name,driver_version,power.limit,clocks.max.sm",
                                                    "--format=csv,noheader"], capture_output=True, text=True,
                                                   timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as err:
            figures["nvidia_smi"] = f"failed: {err}"
    if device.startswith("cuda"):
        checks.append(gc_.check("CUDA device visible", gc_.passed(torch.cuda.is_available()),
                                figures.get("gpu", gc_.no_cuda_reason(device))))
    else:
        checks.append(gc_.check("CUDA device visible", gc_.SKIPPED, gc_.no_cuda_reason(device)))
    checks.append(gc_.check("cockpit_lite imported from this tree", gc_.passed(f" at {ROOT}" in figures["cockpit_lite"]),
                            figures["cockpit_lite"]))
    for name, loss in PACKAGES.items():
        origin = _origin(name)
        figures[f"package {name}"] = origin
        if origin.startswith("missing"):
            gc_.say(f"MISSING {name}: {loss}")
            checks.append(gc_.check(f"package {name}", gc_.SKIPPED, f"{origin}; {loss}"))
    return gc_.stage_result("env", checks, figures)


def _origin(module: str) -> str:
    try:
        if module == "cockpit":  # with the stand-ins benchmarks/cockpit_side.py uses for its plotting imports
            from benchmarks.cockpit_side import import_cockpit

            found = import_cockpit()
            if isinstance(found, str):
                raise ImportError(found)
        m = importlib.import_module(module)
        return f"{getattr(m, '__version__', '?')} at {os.path.dirname(getattr(m, '__file__', '') or '')}"
    except Exception as err:  # ImportError, or a package broken beside this torch
        return f"missing ({type(err).__name__}: {err})"


def cuda_test_files() -> List[str]:
    """The test files with a test that asks for a GPU."""
    files = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True)):
        with open(path) as fh:
            text = fh.read()
        if re.search(r"skipif\(\s*not\s+torch\.cuda\.is_available\(\)", text):
            files.append(os.path.relpath(path, ROOT))
    return files


def stage_cuda_tests(device: str, tiny: bool, out: str, limit_s: float = 110) -> dict:
    files = cuda_test_files()
    if not gc_.cuda_ok(device):
        return gc_.stage_result("cuda_tests", [gc_.check("CUDA tests", gc_.SKIPPED, gc_.no_cuda_reason(device) +
                                                         f"; would run {', '.join(files)}")], {"files": files})
    log = os.path.join(out, "pytest_cuda.log")
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:
        text, rc = f"{err.stdout or ''}\n{err.stderr or ''}\ntimed out after {limit_s:.0f} s", None
        text = text if isinstance(text, str) else text.decode(errors="replace")
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n" + text)
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text)}
    cuda_skips = re.findall(r"SKIPPED.*needs a CUDA GPU", text)
    ok = rc == 0 and not cuda_skips
    detail = (f"{', '.join(f'{v} {k}' for k, v in counts.items()) or 'no summary'} in {', '.join(files)}"
              + (f"; {len(cuda_skips)} CUDA test(s) skipped on a GPU machine" if cuda_skips else "")
              + ("; timed out" if rc is None else "") + " (pytest_cuda.log)")
    return gc_.stage_result("cuda_tests", [gc_.check("CUDA tests", gc_.passed(ok), detail, **counts)], {"files": files})


LOCAL = {"env": stage_env, "cuda_tests": stage_cuda_tests}


def run_stage_here(name: str, device: str, tiny: bool, out: str, result_path: str, limit_s: float) -> None:
    """Child process: run one stage, write its result."""
    module = STAGES[name][0]
    fn = LOCAL[name] if module is None else importlib.import_module(module).run
    try:
        if name == "cuda_tests":
            result = stage_cuda_tests(device, tiny, out, limit_s=max(5.0, limit_s - 10))
        else:
            result = fn(device, tiny, out)
    except Exception as err:
        import traceback

        traceback.print_exc()
        result = gc_.stage_result(name, [gc_.check(f"stage {name}", gc_.FAIL, f"raised {type(err).__name__}: {err}")])
    gc_.write_json(result_path, result)


# -- the parent: one process per stage, with its own limit ----------------------------------------
def run_stage(name: str, args, limit_s: float, work: str) -> dict:
    result_path = os.path.join(work, f"{name}.json")
    cmd = [sys.executable, "-u", os.path.abspath(__file__), "--stage", name, "--device", args.device, "--out", args.out,
           "--result", result_path, "--limit", str(limit_s)] + (["--tiny"] if args.tiny else [])
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = threading.Thread(target=_relay, args=(proc, name), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        rc = None
    reader.join(timeout=5)
    elapsed = time.time() - t0
    result = gc_.read_json(result_path)
    if result is None:
        why = f"stopped at its time limit ({limit_s:.0f} s)" if rc is None else f"exited with {rc} before writing its result"
        result = gc_.stage_result(name, [gc_.check(f"stage {name}", gc_.FAIL, why)])
    elif rc is None:
        result["checks"].append(gc_.check(f"stage {name}", gc_.FAIL, f"stopped at its time limit ({limit_s:.0f} s)"))
    result["elapsed_s"] = round(elapsed, 1)
    result["limit_s"] = round(limit_s, 1)
    return result


def _relay(proc, name):
    for line in proc.stdout:
        print(f"  {name}| {line.rstrip()}", flush=True)


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the stage's own process group (start_new_session)
        proc.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="cuda, cuda:N, cpu, or auto (the GPU when torch sees one)")
    ap.add_argument("--tiny", action="store_true", help="small problems, few steps: the pipeline in ~1 min on a CPU")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "gpu_out"))
    ap.add_argument("--budget-s", type=float, default=450, help="all stages together (default 450 s)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"a subset of {','.join(STAGES)}")
    ap.add_argument("--apply-block", metavar="GPU_BLOCK_MD", help="write this gpu_block.md into docs/benchmarks.md")
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, default=120, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.apply_block:
        return apply_block(args.apply_block)
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    if args.stage:
        return run_stage_here(args.stage, args.device, args.tiny, args.out, args.result, args.limit)
    names = [s for s in args.stages.split(",") if s]
    unknown = [s for s in names if s not in STAGES]
    if unknown:
        raise SystemExit(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    t_start = time.time()
    gc_.say(f"GPU check: device {args.device}{' (tiny)' if args.tiny else ''}, stages {', '.join(names)}, "
            f"budget {args.budget_s:.0f} s, output {args.out}")
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        for name in names:
            left = args.budget_s - (time.time() - t_start)
            limit = min(STAGES[name][1] * (1 if args.device.startswith("cuda") else CPU_SLACK), left)
            if limit < 10:
                results[name] = gc_.stage_result(name, [gc_.check(f"stage {name}", gc_.SKIPPED,
                                                                  f"the budget of {args.budget_s:.0f} s was spent")])
                gc_.say(f"stage {name}: SKIPPED (budget spent)")
                continue
            gc_.say(f"stage {name}: start (limit {limit:.0f} s)")
            results[name] = run_stage(name, args, limit, work)
            statuses = [c["status"] for c in results[name]["checks"]]
            gc_.say(f"stage {name}: {results[name]['elapsed_s']:.0f} s, " +
                    ", ".join(f"{statuses.count(s)} {s}" for s in (gc_.PASS, gc_.FAIL, gc_.SKIPPED) if statuses.count(s)))
    summary = write_outputs(results, args, time.time() - t_start)
    gc_.say(f"done in {summary['elapsed_s']:.0f} s: {summary['verdict']} -> {args.out}")
    print(open(os.path.join(args.out, "summary.md")).read())
    return 0


def write_outputs(results: Dict[str, dict], args, elapsed: float) -> dict:
    from benchmarks import gpu_report, gpu_timing

    timing = gc_.read_json(os.path.join(args.out, "timing.json"))
    r = results.get("timing")
    if r is not None and timing and not any(c["name"].startswith("time ") for c in r["checks"]):
        r["checks"] = gpu_timing.summarize(timing, args.device)["checks"] + r["checks"]  # a stage stopped midway
    summary = gpu_report.summary(results, args.device, args.tiny, elapsed)
    gc_.write_json(os.path.join(args.out, "summary.json"), summary)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(gpu_report.markdown(summary))
    with open(os.path.join(args.out, "gpu_block.md"), "w") as fh:
        fh.write(gpu_report.gpu_block(timing, args.device, summary) + "\n")
    return summary


def apply_block(path: str, docs: str = os.path.join(ROOT, "docs", "benchmarks.md")) -> int:
    from benchmarks import run

    with open(path) as fh:
        text = fh.read().strip()
    if "Dry run on the CPU" in text:
        raise SystemExit(f"{path} holds a dry run on the CPU, not GPU figures: not applied")
    run.update_readme(text, path=docs, block="benchmarks-gpu")
    print(f"{docs}: GPU block replaced from {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
