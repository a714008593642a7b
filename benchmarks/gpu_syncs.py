"""Stage ``syncs``: no quantity makes the host wait for the GPU on a step it does not track.

A host sync (``.item()``, ``.cpu()``, ``torch.cuda.synchronize``, a device-to-host copy) stalls the
Python thread until the queued kernels finish, so the next step cannot be queued meanwhile: on an
untracked step it is overhead that a cheap schedule promises not to have. Two independent counters,
each per training iteration (zero_grad, forward, loss, backward, step):

* ``torch.cuda.set_sync_debug_mode("warn")``: torch warns at every synchronizing CUDA call it knows
  of; the warnings are recorded and counted;
* the profiler (``torch.profiler``, CPU + CUDA activities): CUDA runtime calls named
  ``cuda*Synchronize`` (stream, device, event) and device-to-host ``Memcpy`` ones.

Runs on the CNN (benchmarks/problems.py), SGD with momentum:

1. the plain loop (the baseline: a model's own syncs are not the cockpit's);
2. the ``full`` preset plus ``energy``, every quantity on ``every:4`` (steps 0, 4, 8 tracked, the rest
   untracked): the check is zero syncs above the plain loop's on every untracked step;
3. for the record (no target): syncs per step of the ``default`` preset (tracked every step) and of the
   ``full`` preset with its default schedules at step 1000 on.

Without CUDA the loops still run (a dry run of the machinery) and the counts are SKIPPED.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cockpit_lite  # noqa: E402
from benchmarks import gpu_common as gc_  # noqa: E402
from benchmarks import problems, variants  # noqa: E402

EVERY = 4


def count_sync_warnings(fn: Callable[[], None]) -> int:
    """Number of "synchronizing CUDA operation" warnings ``fn`` raises under the sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message).lower())


def is_sync_event(name: str) -> bool:
    """A CUDA runtime call that blocks the host: cuda*Synchronize, or a device-to-host copy that is
    not asynchronous (cudaMemcpy, cudaMemcpyDtoH; cudaMemcpyAsync is followed by its synchronize)."""
    low = name.lower()
    if not low.startswith("cu"):
        return False
    if "synchronize" in low:
        return True
    return low in ("cudamemcpy", "cumemcpydtoh", "cumemcpydtoh_v2", "cudamemcpyfromsymbol")


def count_profiler_syncs(fn: Callable[[], None]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    return sum(1 for e in prof.events() if is_sync_event(e.name))


def per_step_counts(step: Callable[[], None], first: int, steps: int, cuda: bool, profiler: bool = True) -> List[dict]:
    """For steps ``first .. first + steps - 1``: {"step", "warned", "profiled"} (None without CUDA)."""
    out = []
    for i in range(first, first + steps):
        if not cuda:
            step()
            out.append({"step": i, "warned": None, "profiled": None})
            continue
        torch.cuda.synchronize()  # queued work of the previous step is not this step's
        warned = count_sync_warnings(step)
        torch.cuda.synchronize()
        out.append({"step": i, "warned": warned, "profiled": None})
    if cuda and profiler:  # a second pass, the same steps' successors, with the profiler (its own overhead)
        for row in out:
            torch.cuda.synchronize()
            row["profiled"] = count_profiler_syncs(step)
    return out


def _loop(spec: Optional[Dict[str, str]], start: int, logdir: Optional[str], problem):
    step, cockpit, _ = problems.training_step(problem, spec, logdir)
    if cockpit is not None:
        cockpit.step = start  # the schedules depend only on the step index
    return step, cockpit


def run(device: str, tiny: bool, out: str) -> dict:
    cuda = gc_.cuda_ok(device)
    problems.set_device(device if cuda else "cpu")
    problem = problems.make("cnn", batch_size=16) if tiny else problems.get("cnn")
    n = 2 * EVERY + 1 if tiny else 3 * EVERY + 1
    spec = {q: f"every:{EVERY}" for q in cockpit_lite.presets.preset("full")}
    spec["energy"] = f"every:{EVERY}"
    rows, figures = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        gc_.say("syncs: plain loop")
        step, _ = _loop(None, 0, None, problem)
        step()  # warm-up (CUDA context, cuDNN plans, allocator)
        rows["plain"] = per_step_counts(step, 1, 3, cuda, profiler=cuda)
        gc_.say(f"syncs: full preset + energy on every:{EVERY}")
        step, cp = _loop(spec, 0, os.path.join(tmp, "every4"), problem)
        rows["full every:4"] = per_step_counts(step, 0, n, cuda, profiler=False)
        cp.close()
        # the profiler pass on a fresh cockpit over the same step indices
        if cuda:
            step, cp = _loop(spec, 0, os.path.join(tmp, "every4-prof"), problem)
            for r in rows["full every:4"]:
                torch.cuda.synchronize()
                r["profiled"] = count_profiler_syncs(step)
            cp.close()
        gc_.say("syncs: default preset (every step), full preset (default schedules, step 1000 on)")
        step, cp = _loop(cockpit_lite.presets.preset("default"), 0, os.path.join(tmp, "default"), problem)
        step()
        rows["default (every step)"] = per_step_counts(step, 1, 3, cuda, profiler=False)
        cp.close()
        step, cp = _loop(cockpit_lite.presets.preset("full"), variants.STEADY_STATE + 1, os.path.join(tmp, "full"), problem)
        rows["full (default schedules)"] = per_step_counts(step, variants.STEADY_STATE + 1, 3, cuda, profiler=False)
        cp.close()
    tracked = {i for i in range(n) if i % EVERY == 0}
    untracked = [r for r in rows["full every:4"] if r["step"] not in tracked]
    checks = []
    if not cuda:
        checks.append(gc_.check("no host sync on untracked steps", gc_.SKIPPED, gc_.no_cuda_reason(device),
                                untracked_steps=[r["step"] for r in untracked]))
    else:
        # the plain loop's steady count (the first profiled step may include the profiler's start)
        base_w = min(r["warned"] for r in rows["plain"])
        base_p = min(r["profiled"] for r in rows["plain"])
        extra = [(r["step"], r["warned"] - base_w, (r["profiled"] or 0) - base_p) for r in untracked]
        bad = [e for e in extra if e[1] > 0 or e[2] > 0]
        checks.append(gc_.check(
            "no host sync on untracked steps", gc_.passed(not bad),
            (f"full preset + energy on every:{EVERY}, CNN; plain loop: {base_w} warned / {base_p} profiled syncs per step; "
             f"untracked steps {[e[0] for e in extra]}: extra syncs (warned, profiled) {[(e[1], e[2]) for e in extra]}"),
            plain_warned=base_w, plain_profiled=base_p))
        for name in ("default (every step)", "full (default schedules)", "full every:4"):
            figures[f"syncs per step, {name}"] = {r["step"]: [r["warned"], r["profiled"]] for r in rows[name]}
        tracked_w = [r["warned"] for r in rows["full every:4"] if r["step"] in tracked]
        figures["tracked steps of full every:4, warned syncs (median)"] = statistics.median(tracked_w) if tracked_w else None
    figures["rows"] = rows
    return gc_.stage_result("syncs", checks, figures)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)
    print(run(args.device, args.tiny, args.out))


if __name__ == "__main__":
    main()
