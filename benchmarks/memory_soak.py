"""Resident memory over many tracked steps, with Python's cyclic garbage collector disabled.

A tracked step must free what it captured (layer inputs, output gradients, per-sample statistics)
by reference counting when it ends: with ``gc.disable()`` a reference cycle anywhere in a step's
objects shows here as RSS that climbs by about one step's captures per tracked step.

The model is torchvision's ResNet-18 with GroupNorm (per-sample gradients need no BatchNorm) on
small images (default 32x32, batch 64). The script runs a few warm-up steps (optimizer state, lazy
set-up), reads the resident set size (``VmRSS``), runs ``--steps`` steps watched by ``--preset``
(every quantity on every step with ``--schedule every``, the default: every step is a per-sample
step) and reports the growth against the goal: less than the largest layer's activation over the
batch (B x its per-sample size). The plain loop (no cockpit) is measured the same way first.

    python benchmarks/memory_soak.py --steps 200          # the full soak (slow on a CPU)
    python benchmarks/memory_soak.py --steps 30 --json    # a reduced one
    python benchmarks/memory_soak.py --advisor            # with the live advisor
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def resnet18_groupnorm(classes: int = 10):
    import torch.nn as nn
    from torchvision.models import resnet18

    return resnet18(num_classes=classes, norm_layer=lambda c: nn.GroupNorm(32, c))


def largest_activation_mb(model, x) -> float:
    """The largest output of any leaf module on batch ``x``, in MB (float32)."""
    import torch

    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.numel() * o.element_size()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return max(sizes) / 2 ** 20


def soak(steps: int, batch: int, size: int, preset: str, schedule: str, warmup: int, watched: bool,
         advisor: bool = False) -> dict:
    import torch
    import torch.nn as nn

    import cockpit_lite
    from cockpit_lite import presets

    torch.manual_seed(0)
    model = resnet18_groupnorm()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 10, (batch,))
    tmp = tempfile.TemporaryDirectory()
    cockpit = None
    if watched:
        spec = presets.preset(preset, None if schedule == "preset" else schedule)
        cockpit = cockpit_lite.watch(model, opt, loss_fn=crit, logdir=os.path.join(tmp.name, "run"), quantities=spec,
                                     advisor=advisor)

    def step():
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    gc.collect()
    _trim()
    gc.disable()
    try:
        start = rss_mb()
        trace = []
        t0 = time.perf_counter()
        for i in range(steps):
            step()
            trace.append(round(rss_mb() - start, 1))
        seconds = time.perf_counter() - t0
        _trim()
        end = rss_mb()
    finally:
        gc.enable()
        if cockpit is not None:
            cockpit.close()
        tmp.cleanup()
    return {"start_mb": round(start, 1), "end_mb": round(end, 1), "growth_mb": round(end - start, 1),
            "peak_growth_mb": max(trace), "trace_mb": trace, "seconds_per_step": round(seconds / steps, 2)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--preset", default="economy")
    ap.add_argument("--schedule", default="every", help="'every', or 'preset' for the preset's own schedules")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--advisor", action="store_true", help="watch with advisor=True (its windows are bounded too)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(0)
    act = largest_activation_mb(resnet18_groupnorm(), torch.randn(args.batch, 3, args.size, args.size))
    out = {"model": "resnet18 (GroupNorm)", "batch": args.batch, "image": args.size, "steps": args.steps,
           "preset": args.preset, "schedule": args.schedule, "gc": "disabled", "advisor": args.advisor,
           "largest_activation_mb": round(act, 1)}
    out["plain"] = soak(args.steps, args.batch, args.size, args.preset, args.schedule, args.warmup, watched=False)
    out["watched"] = soak(args.steps, args.batch, args.size, args.preset, args.schedule, args.warmup, watched=True,
                          advisor=args.advisor)
    growth = out["watched"]["growth_mb"]
    out["goal_mb"] = out["largest_activation_mb"]
    out["within_goal"] = growth < out["goal_mb"]
    if args.json:
        print(json.dumps(out))
    else:
        for name in ("plain", "watched"):
            r = out[name]
            print(f"{name:8s} RSS {r['start_mb']:8.1f} -> {r['end_mb']:8.1f} MB  growth {r['growth_mb']:+7.1f} MB "
                  f"(peak {r['peak_growth_mb']:+.1f})  {r['seconds_per_step']} s/step")
        print(f"goal: growth < largest activation over the batch = {out['goal_mb']} MB: "
              f"{'met' if out['within_goal'] else 'NOT met'} ({args.steps} steps, gc disabled)")
    return out


if __name__ == "__main__":
    main()
