"""Peak memory of a training step, plain and watched, measured in a fresh subprocess.

On a GPU (``benchmarks/problems.py``'s device is CUDA) the peak is CUDA's own allocator statistic,
``torch.cuda.max_memory_allocated`` above the allocated size before the variant (reset per variant),
i.e. the device memory the step needs; the rest of this text is about the CPU.

torch's CPU allocator keeps no statistics and ``tracemalloc`` does not see its buffers, so the peak
is read from the kernel: the process's peak resident set size (``VmHWM`` in ``/proc/self/status``),
reset to the current size by writing ``5`` to ``/proc/self/clear_refs`` (Linux). Per variant:

1. free what the previous variant left (``gc``, glibc ``malloc_trim``), read the resident size;
2. build a fresh model (plain, or watched by a cockpit tracking the variant's quantities), run its
   steps, read the peak: ``peak MB`` is the peak above the resident size of step 1, so it holds the
   model, the optimizer state, the activations and gradients, and the cockpit's own state and buffers;
3. the plain loop is measured the same way right before each variant, in the same process; ``ratio``
   is watched / plain, ``extra`` the difference.

The subprocess runs with glibc's mmap threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so every
large buffer is returned to the kernel when freed and a freed buffer of one variant cannot hide the
next variant's allocations. Page granularity and the allocator's small-object pools leave an error of
about 1 MB: compare MB, not KB.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, Optional, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.abspath(__file__)


def unsupported_reason() -> Optional[str]:
    """Why peak memory cannot be measured here (None when it can)."""
    from benchmarks import problems

    if problems.on_gpu():
        return None
    try:
        with open("/proc/self/status") as fh:
            if "VmHWM:" not in fh.read():
                return "/proc/self/status has no VmHWM"
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError as err:
        return f"peak RSS cannot be read or reset on this system ({err})"
    return None


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def _release():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_of(run) -> float:
    """MB by which the resident set (on a GPU: CUDA's allocated memory) peaked above its size before
    ``run()`` (which frees what it built)."""
    _release()
    from benchmarks import problems

    if problems.on_gpu():
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    base = _status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # VmHWM := VmRSS
    run()
    return _status_mb("VmHWM") - base


def _child(problem_spec: dict, optimizer: str, variants: Dict[str, list]):
    """In the subprocess: {variant: {"plain_mb", "mb"}} printed as one JSON line."""
    from benchmarks import problems

    problem = problems.make(**problem_spec)

    def loop(spec, start, steps, logdir):
        def run():
            step, cockpit, _ = problems.training_step(problem, spec, logdir, optimizer=optimizer)
            if cockpit is not None:
                cockpit.step = start
            for _ in range(steps):
                step()
            if cockpit is not None:
                cockpit.close()
        return run

    import cockpit_lite.quantities  # noqa: F401  one-time imports are no variant's memory
    try:
        import backpack  # noqa: F401  (exact curvature diagonals import it lazily)
    except ImportError:
        pass
    loop(None, 0, 2, None)()  # torch's lazy one-time set-up (thread pools, kernels) is not any variant's either
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (spec, start, steps)) in enumerate(variants.items()):
            plain = _peak_of(loop(None, 0, steps, None))
            watched = _peak_of(loop(spec, start, steps, os.path.join(tmp, str(i))))
            out[name] = {"plain_mb": plain, "mb": watched}
    print(json.dumps(out))


def measure(problem_spec: dict, optimizer: str, variants: Dict[str, Tuple[dict, int, int]],
            timeout: float = 1800) -> Dict[str, dict]:
    """{variant: {"plain_mb", "mb", "ratio", "extra_mb"}} for variants name -> (quantities, start step,
    steps), all in one fresh subprocess; {variant: {"reason"}} where memory cannot be measured."""
    reason = unsupported_reason()
    if reason is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        arg = json.dumps({"problem": problem_spec, "optimizer": optimizer, "variants": variants})
        proc = subprocess.run([sys.executable, HERE, "--child"], input=arg, capture_output=True, text=True,
                              env=env, timeout=timeout)
        if proc.returncode == 0:
            raw = json.loads(proc.stdout.strip().splitlines()[-1])
            return {n: dict(m, ratio=m["mb"] / m["plain_mb"] if m["plain_mb"] > 0 else float("nan"),
                            extra_mb=m["mb"] - m["plain_mb"]) for n, m in raw.items()}
        reason = f"memory subprocess failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
    return {n: {"reason": reason} for n in variants}


if __name__ == "__main__" and sys.argv[1:] == ["--child"]:
    args = json.loads(sys.stdin.read())
    _child(args["problem"], args["optimizer"], args["variants"])
