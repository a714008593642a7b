"""Time `cockpit-lite plot` on a synthetic 100,000-step log with every quantity of docs/record-keys.md.

    python benchmarks/plot_speed.py [--steps 100000] [--rounds 3] [--logdir /tmp/cockpit-plot-speed] [--out plot.png]

Reports (JSON on the last line) the time to write the log (not part of plotting) and the
end-to-end time of the command in a fresh process (`python -m cockpit_lite.cli plot LOG -o OUT`,
imports included), medians over ``--rounds`` rounds that take turns, each as wall and CPU seconds:
- `command_cold_*`: no reader's cache next to the log: the whole log is decoded (a finished log
  without building its records, cockpit_lite/runlog/scan.py) and the cache is written;
- `command_*`: starting from that cache;
- the same with `--one-process` (`*_one_process_*`): the PNG rasterized in this process only,
  where the default draws its two halves at once in two processes (cockpit_lite/dashboard_png.py).
Then an in-process breakdown: reading the log without a cache (`load_cold`: decoding, columns,
writing the cache) and with it (`load`), creating the figure's artists (`draw`, matplotlib's import
included), rasterizing and writing the PNG in one process (`save_png`) and in two (`save_png_two`).
`orjson` says whether the reader found orjson (its optional fast decoder). On a machine shared
with other jobs the wall time is inflated by waiting for a core; `load_avg_1min` tells how busy it
was. Lines are downsampled for display only (min/max envelope, at most 2,000 points per line); the
log is never modified.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=3, help="command runs per variant (medians are reported)")
    p.add_argument("--logdir", default=os.path.join(tempfile.gettempdir(), "cockpit-plot-speed"))
    p.add_argument("--out", default=None, help="PNG to write (default: LOGDIR/plot.png)")
    args = p.parse_args(argv)

    from cockpit_lite.testing import write_synthetic_log

    logdir = Path(args.logdir) / f"steps{args.steps}"
    out = Path(args.out or Path(args.logdir) / f"plot{args.steps}.png")
    t = time.perf_counter()
    if not (logdir / "cockpit.jsonl").exists():
        write_synthetic_log(logdir, args.steps, hist_every=100, curvature_every=10)
        write_s = time.perf_counter() - t
    else:
        write_s = None  # reused from an earlier run
    size_mb = (logdir / "cockpit.jsonl").stat().st_size / 1e6

    from cockpit_lite.runlog.cache import RunCache

    cache = RunCache(logdir / "cockpit.jsonl").path

    def command(*extra, cold=False):
        if cold:
            cache.unlink(missing_ok=True)
        t, before = time.perf_counter(), os.times()
        proc = subprocess.run([sys.executable, "-m", "cockpit_lite.cli", "plot", str(logdir), "-o", str(out), *extra],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall, after = time.perf_counter() - t, os.times()
        if proc.returncode:
            raise SystemExit(f"cockpit-lite plot failed:\n{proc.stderr}")
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        return proc, wall, cpu

    runs: dict = {}
    for _ in range(args.rounds):  # the variants take turns: a busy spell of the machine hits all alike
        for name, extra in (("", ()), ("_one_process", ("--one-process",))):
            for kind, cold in (("command_cold", True), ("command", False)):
                proc, wall, cpu = command(*extra, cold=cold)
                runs.setdefault(f"{kind}{name}", []).append((wall, cpu))
    commands = {}
    for key, samples in runs.items():
        commands[f"{key}_s"] = round(statistics.median(w for w, _ in samples), 2)
        commands[f"{key}_cpu_s"] = round(statistics.median(c for _, c in samples), 2)

    import cockpit_lite
    from cockpit_lite import dashboard, runlog

    clock = {}

    def timed(name, fn):
        t, c = time.perf_counter(), time.process_time()
        value = fn()
        clock[name] = (time.perf_counter() - t, time.process_time() - c)
        return value

    import gc

    # as `cockpit-lite plot` does: read with the collector off, then freeze what was read
    gc.disable()
    cache.unlink(missing_ok=True)
    timed("load_cold", lambda: cockpit_lite.load(logdir))
    run = timed("load", lambda: cockpit_lite.load(logdir))
    gc.freeze()
    gc.enable()
    fig = timed("draw", lambda: dashboard.figure(dashboard.layout(dashboard._views(run, None))))
    timed("save_png", lambda: dashboard.save(fig, out))
    timed("save_png_two", lambda: dashboard.save(fig, out, two_processes=True))
    gc.unfreeze()
    result = {"steps": args.steps, "log_mb": round(size_mb, 1), "write_log_s": write_s and round(write_s, 2),
              "rounds": args.rounds, **commands,
              **{f"{k}_s": round(v[0], 2) for k, v in clock.items()},
              **{f"{k}_cpu_s": round(v[1], 2) for k, v in clock.items()},
              "png": str(out), "orjson": runlog.codec._orjson_loads is not None, "cpus": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 1)}
    print(proc.stdout.strip())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
