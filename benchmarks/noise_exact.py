"""early_stopping's float64 path (``_noise.snr_sums(exact=True)``): chunked, against whole-tensor arithmetic.

early_stopping's value 1 - n mean_j r_j cancels near 0 (a gradient that is mostly noise, common early in
training), and then the r_j are recomputed in float64. Done one whole tensor at a time, every temporary of
a large weight (1.6 MB for 784x256) is a fresh mmap that the kernel page-faults in on first touch; on the
development VM a fault costs ~2 us, and the MLP's exact path took 5.3 ms (4x a plain step). Chunks of
``EXACT_CHUNK`` elements keep the temporaries in malloc's free lists. This script times both on the MLP's
shapes, side by side in one process (interleaved rounds, medians), counts page faults per call, and checks
that both give the same numbers (float64, 1e-12 relative).

    python benchmarks/noise_exact.py [--rounds 15] [--calls 20]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cockpit_lite.quantities import _noise  # noqa: E402

SHAPES = [(256, 784), (256,), (128, 256), (128,), (10, 128), (10,)]  # the MLP 784-256-128-10
A, B, EPS = 1 / 127, 128 / 127, 1e-5  # early_stopping's variance at n = 128


def whole_tensors(grads, m2s):
    """The float64 arithmetic one whole tensor at a time (the path before chunking)."""
    parts, errs, tops = [], [], []
    for g, m2 in zip(grads, m2s):
        g = g.double()
        big = m2.double() * A
        v = big.addcmul(g, g, value=-B).add_(EPS)
        r = torch.div(g, v).mul_(g)
        parts.append(float(r.sum()))
        errs.append(float((r * big / v).sum()))
        tops.append(float(r.max()))
    return np.array(parts), np.array(errs), np.array(tops)


class _View:
    frozen = set()


class _Ctx:
    per_sample = _View()


def chunked(grads, m2s):
    """The library's path (``_noise.snr_sums(exact=True)``) on these tensors."""
    _noise.mean_grad, _noise.second_moment = (lambda ctx: grads), (lambda ctx: m2s)
    parts, _, errs, tops = _noise.snr_sums(_Ctx, A, B, EPS, exact=True)
    return parts, errs, tops


def _timed(f, args, calls):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    for _ in range(calls):
        f(*args)
    return (time.perf_counter() - t0) / calls * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / calls


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    grads = [torch.randn(s) * 0.01 for s in SHAPES]
    m2s = [g * g * 128 + torch.rand(s) * 1e-3 for g, s in zip(grads, SHAPES)]
    ref, new = whole_tensors(grads, m2s), chunked(grads, m2s)
    worst = max(float(np.max(np.abs(x - y) / np.abs(x))) for x, y in zip(ref, new))
    times = {"whole tensors": [], "chunked": []}
    faults = {k: [] for k in times}
    for i in range(args.rounds):
        order = [("whole tensors", whole_tensors), ("chunked", chunked)]
        for name, f in (order if i % 2 == 0 else order[::-1]):
            ms, pf = _timed(f, (grads, m2s), args.calls)
            times[name].append(ms)
            faults[name].append(pf)
    print(f"exact snr_sums on the MLP's shapes, {args.threads} thread(s), medians of {args.rounds} rounds x {args.calls} calls")
    for name in times:
        print(f"  {name:14s} {statistics.median(times[name]):7.3f} ms  {statistics.median(faults[name]):7.0f} page faults/call")
    ratio = statistics.median(w / c for w, c in zip(times["whole tensors"], times["chunked"]))
    print(f"  whole / chunked: {ratio:.2f}x (median of per-round ratios); largest relative difference {worst:.1e}")
    return 0 if worst < 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
