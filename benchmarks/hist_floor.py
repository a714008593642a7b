"""A floor under issue 21's default-schedule targets on large conv nets: the 1D histogram of the per-sample
gradient elements has to touch each of the B x P elements once per per-sample step, however it is computed.

Times, side by side in one process (interleaved rounds, medians and ranges of ``--rounds``): a plain
training step of the problem, and counting a histogram of B x P float32 values (random, drawn once; per
parameter as the quantity does: ``persample/samples.py``'s ``_histc``, max |g| and the counts) with
today's kernel (``count_ms``) and with the kernel before issue 21's histcount work (``count_old_ms``:
``samples._histc_clamped``, its fallback: aminmax, then int32 bincount in 2^20 chunks, single-threaded). No per-sample gradients are
built, so this is below what any implementation of ``grad_hist_1d`` costs. With the economy preset's
schedules (per-sample quantities every 10 steps), the histogram alone adds ``count / plain / 10`` to the
average step.

``--raw N`` instead times old and new on N random float32 values (one tensor) with 1 and 2 torch threads;
``--exhaustive R [R ...]`` compares old and new on every float32 value in [-1.5R, 1.5R] (about 2 x 10^9 per
R, ~15 s each), in blocks of 2^26 consecutive values: both kernels are monotone in the value, so equal counts
per block mean the same bin for every value.

    python benchmarks/hist_floor.py [--problem resnet18_gn] [--rounds 5]
    python benchmarks/hist_floor.py --raw 67108864 --rounds 7 [--quiet-wait 5]
    python benchmarks/hist_floor.py --exhaustive 1.0 0.3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def old_histc(G: torch.Tensor, R: float, bins: int):
    """The kernel before issue 21's histcount work: ``samples._histc_clamped`` (aminmax, then int32
    bincount in 2^20 chunks, single-threaded), which ``_histc`` still falls back to."""
    from cockpit_lite.persample.samples import _histc_clamped
    return _histc_clamped(G, R, bins)


def _stats(xs) -> dict:
    return {"median": round(statistics.median(xs) * 1e3, 1), "min": round(min(xs) * 1e3, 1),
            "max": round(max(xs) * 1e3, 1)}


def _cpu_ticks():
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None off Linux."""
    try:
        with open("/proc/stat") as f:
            v = [int(a) for a in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


def wait_quiet(max_s: float) -> None:
    """Waits (up to max_s seconds) for a 0.2 s window in which the machine is idle but for us."""
    end = time.perf_counter() + max_s
    while time.perf_counter() < end:
        a = _cpu_ticks()
        time.sleep(0.2)
        b = _cpu_ticks()
        if a is None or b is None or (b[0] - a[0]) - (b[1] - a[1]) <= 0.02 * os.sysconf("SC_CLK_TCK"):
            return


class Timer:
    """Wall times of named calls, each with the CPU time other processes took meanwhile (in cores):
    on a shared machine the rounds where others ran are reported apart (``quiet``: under 0.1 core).
    With ``quiet_wait`` > 0, each call first waits up to that many seconds for an idle machine."""

    def __init__(self, quiet_wait: float = 0.0):
        self.wall, self.foreign, self.quiet_wait = {}, {}, quiet_wait

    def __call__(self, key, fn, *args):
        if self.quiet_wait > 0:
            wait_quiet(self.quiet_wait)
        a, t = _cpu_ticks(), time.perf_counter()
        fn(*args)
        dt = time.perf_counter() - t
        b = _cpu_ticks()
        self.wall.setdefault(key, []).append(dt)
        tick = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        self.foreign.setdefault(key, []).append(
            ((b[0] - a[0]) - (b[1] - a[1])) * tick / dt if a and b else 0.0)

    def quiet_rounds(self, keys):
        n = len(self.wall[keys[0]])
        return [i for i in range(n) if all(self.foreign[k][i] < 0.1 for k in keys)]

    def summary(self, keys) -> dict:
        quiet = self.quiet_rounds(keys)
        out = {"rounds": len(self.wall[keys[0]]), "quiet_rounds": len(quiet)}
        for k in keys:
            out[k] = _stats(self.wall[k])
            if quiet:
                out[k]["quiet_median"] = round(statistics.median(self.wall[k][i] for i in quiet) * 1e3, 1)
        return out


def raw(n: int, rounds: int, quiet_wait: float = 0.0) -> dict:
    from cockpit_lite.persample.samples import _histc

    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 1e-3
    R = 1.05 * float(x.abs().max())
    out = {"values": n}
    threads = torch.get_num_threads()
    try:
        for th in (1, 2):
            torch.set_num_threads(th)
            assert torch.equal(old_histc(x, R, 100)[0], _histc(x, R, 100)[0])
            tm = Timer(quiet_wait)
            for _ in range(rounds):
                tm("old_ms", old_histc, x, R, 100)
                tm("new_ms", _histc, x, R, 100)
            out[f"threads_{th}"] = summ = tm.summary(["old_ms", "new_ms"])
            summ["new_over_old"] = round(summ["new_ms"]["median"] / summ["old_ms"]["median"], 2)
            if summ["quiet_rounds"]:
                summ["new_over_old_quiet"] = round(summ["new_ms"]["quiet_median"] / summ["old_ms"]["quiet_median"], 2)
    finally:
        torch.set_num_threads(threads)
    return out


def _count_all(histc, blocks, R):
    for x in blocks:
        histc(x, R, 100)


def exhaustive(Rs) -> dict:
    import numpy as np

    from cockpit_lite.persample.samples import _histc

    out = {}
    for R in Rs:
        top = int(np.array([1.5 * R], dtype=np.float32).view(np.int32)[0])  # bit pattern of fl(1.5 R)
        values, differing = 0, []
        for sign in (0, -2 ** 31):  # positive values, then negative ones (from -0.0 down)
            for s in range(0, top + 1, 1 << 26):
                x = torch.arange(sign + s, sign + min(s + (1 << 26), top + 1), dtype=torch.int32).view(torch.float32)
                a, b = old_histc(x, R, 100), _histc(x, R, 100)
                values += x.numel()
                if not (torch.equal(a[0], b[0]) and a[1:] == b[1:]):
                    differing.append([sign, s])
        out[repr(R)] = {"values": values, "blocks_differing": differing}
    return out


def main(argv=None) -> dict:
    from benchmarks import problems
    from cockpit_lite.persample.samples import _histc

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problem", default="resnet18_gn")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--raw", type=int, default=0, help="time old and new on this many values instead")
    p.add_argument("--exhaustive", type=float, nargs="+", default=None, metavar="R",
                   help="compare old and new on every float32 value in [-1.5R, 1.5R] instead")
    p.add_argument("--quiet-wait", type=float, default=0.0,
                   help="before each timed call, wait up to this many seconds for the machine to be idle")
    args = p.parse_args(argv)
    if args.exhaustive:
        result = exhaustive(args.exhaustive)
        print(json.dumps(result))
        return result
    if args.raw:
        result = raw(args.raw, args.rounds, args.quiet_wait)
        print(json.dumps(result))
        return result
    problem = problems.get(args.problem)
    step, _, model = problems.training_step(problem)
    b = problem.batch_size
    g = torch.Generator().manual_seed(0)
    blocks = [torch.randn(b, *q.shape, generator=g) * 1e-3 for q in model.parameters()]
    elements = sum(x.numel() for x in blocks)
    R = 1.05 * max(float(x.abs().max()) for x in blocks)  # the range covers every value (no clipping pass)
    step()
    for x in blocks:
        assert torch.equal(old_histc(x, R, 100)[0], _histc(x, R, 100)[0])
    tm = Timer(args.quiet_wait)
    for _ in range(args.rounds):
        tm("plain", step)
        tm("count", _count_all, _histc, blocks, R)
        tm("count_old", _count_all, old_histc, blocks, R)
    med = {k: statistics.median(v) * 1e3 for k, v in tm.wall.items()}
    result = {"problem": args.problem, "batch": b, "threads": torch.get_num_threads(),
              "elements_million": round(elements / 1e6, 1), "plain_ms": round(med["plain"], 1),
              "count_ms": round(med["count"], 1), "count_old_ms": round(med["count_old"], 1),
              "count_x_plain": round(med["count"] / med["plain"], 2),
              "count_old_x_plain": round(med["count_old"] / med["plain"], 2)}
    result["added_per_step_every_10"] = round(result["count_x_plain"] / 10, 3)
    result["detail_ms"] = tm.summary(["plain", "count", "count_old"])
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
