"""Time `cockpit-lite plot` on a synthetic 100,000-step log with every quantity of docs/record-keys.md.

    python benchmarks/plot_speed.py [--steps 100000] [--logdir /tmp/cockpit-plot-speed] [--out plot.png]

Reports (JSON on the last line): the time to write the log (not part of plotting), the end-to-end
time of the command in a fresh process (`python -m cockpit_lite.cli plot LOG -o OUT`, imports
included), first without the reader's cache next to the log (`command_cold_*`: it decodes the whole
log and writes the cache) and then with it (`command_*`), and an in-process breakdown: reading the
log without and with the cache (`load_nocache`: decoding the records; `load`: the cache's columns
and small structures, the records left unbuilt), building the columns of every key from the
decoded records (`columns`, part of the first `series` call when there is no cache), drawing
(matplotlib's import included), saving. `orjson` says whether the reader found orjson (its
optional fast decoder). Each as wall seconds
and as CPU seconds of the process (`*_cpu_s`): on a machine shared with other jobs the wall time
is inflated by waiting for a core, the CPU time much less so; `load_avg_1min` tells how busy it was. Lines are downsampled
for display only (min/max envelope, at most 2,000 points per line); the log is never modified.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--logdir", default=os.path.join(tempfile.gettempdir(), "cockpit-plot-speed"))
    p.add_argument("--out", default=None, help="PNG to write (default: LOGDIR/plot.png)")
    args = p.parse_args(argv)

    from instruments._synthetic import write_synthetic_log

    logdir = Path(args.logdir) / f"steps{args.steps}"
    out = Path(args.out or Path(args.logdir) / f"plot{args.steps}.png")
    t = time.perf_counter()
    if not (logdir / "cockpit.jsonl").exists():
        write_synthetic_log(logdir, args.steps, hist_every=100, curvature_every=10)
        write_s = time.perf_counter() - t
    else:
        write_s = None  # reused from an earlier run
    size_mb = (logdir / "cockpit.jsonl").stat().st_size / 1e6

    def command():
        t, before = time.perf_counter(), os.times()
        proc = subprocess.run([sys.executable, "-m", "cockpit_lite.cli", "plot", str(logdir), "-o", str(out)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        wall, after = time.perf_counter() - t, os.times()
        if proc.returncode:
            raise SystemExit(f"cockpit-lite plot failed:\n{proc.stderr}")
        cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
        return proc, round(wall, 2), round(cpu, 2)

    from cockpit_lite.runlog_cache import RunCache

    cache = RunCache(logdir / "cockpit.jsonl").path
    cache.unlink(missing_ok=True)
    _, cold_s, cold_cpu_s = command()  # decodes the whole log, writes the cache
    proc, command_s, command_cpu_s = command()  # starts from the cache

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
    decoded = timed("load_nocache", lambda: cockpit_lite.load(logdir, cache=False))
    timed("columns", decoded.columns)  # what a load without a valid cache does on the first series call
    decoded = None
    run = timed("load", lambda: cockpit_lite.load(logdir))
    gc.freeze()
    gc.enable()
    fig = timed("draw", lambda: dashboard.figure(dashboard.layout(dashboard._views(run, None))))
    timed("save_png", lambda: dashboard.save(fig, out))
    gc.unfreeze()
    result = {"steps": args.steps, "log_mb": round(size_mb, 1), "write_log_s": write_s and round(write_s, 2),
              "command_cold_s": cold_s, "command_cold_cpu_s": cold_cpu_s,
              "command_s": command_s, "command_cpu_s": command_cpu_s,
              **{f"{k}_s": round(v[0], 2) for k, v in clock.items()},
              **{f"{k}_cpu_s": round(v[1], 2) for k, v in clock.items()},
              "png": str(out), "orjson": runlog._orjson_loads is not None, "cpus": os.cpu_count(),
              "load_avg_1min": round(os.getloadavg()[0], 1)}
    print(proc.stdout.strip())
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
