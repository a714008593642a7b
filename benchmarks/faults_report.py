"""Issue 24's "done when" figures for faults, as one small table (docs/reliability.md).

* full disk: a watched MLP trains 100 steps while every log write from step 20 to 59 fails with ENOSPC
  (the writer's file is wrapped as in tests/runlog/test_runlog_write_faults.py); did training finish, is the
  log readable, how many steps it holds, how many records were dropped;
* racing starts: ``--races`` trials of ``--racers`` processes (forked, released together by a barrier)
  creating a run log in one logdir with ``if_exists="error"``; a mixed log (two headers, or records of
  two writers) counts as a failure, and so does a trial without exactly one winner;
* malformed values: each class of tests/runlog/test_runlog_bad_input.py's BAD_LINES put between two good
  step records; one reported bad line, the other records read, and ``cockpit-lite plot`` writing a PNG;
* memory: ``--soak FILE`` adds the figures of ``benchmarks/memory_soak.py --json`` saved in FILE.

    python benchmarks/faults_report.py [--races 50] [--racers 4] [--soak soak.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from layout import use_test_dirs  # noqa: E402

use_test_dirs()  # the fault classes are defined by tests/runlog's test modules


def full_disk(tmp: str) -> dict:
    import torch
    from torch import nn

    import cockpit_lite
    from test_runlog_write_faults import FailingFile

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    logdir = os.path.join(tmp, "disk")
    x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
    finished, error = False, ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cp = cockpit_lite.watch(net, opt, loss_fn=crit, logdir=logdir, quantities="economy")
            disk = cp._writer._fh = FailingFile(cp._writer._fh, partial=7)
            for step in range(100):
                disk.failing = 20 <= step < 60
                opt.zero_grad()
                crit(net(x), y).backward()
                opt.step()
            disk.failing = False
            cp.close()
            finished = True
        except Exception as err:  # the figure to report: training must never see the write's error
            error = repr(err)
    try:
        run = cockpit_lite.load(logdir, cache=False)
        readable, steps, dropped = True, len(run.steps()), (run.footer or {}).get("dropped_records")
    except Exception as err:
        readable, steps, dropped = False, 0, repr(err)
    return {"training_finished": finished, "error": error, "log_readable": readable, "steps_logged": steps,
            "dropped_records": dropped, "warnings": sum("writing the run log" in str(w.message) for w in caught)}


def _racer(logdir: str, barrier, wid: int, out) -> None:
    from cockpit_lite.runlog import RunLogWriter

    barrier.wait()
    try:
        w = RunLogWriter(logdir, {"writer": wid})
    except FileExistsError:
        out.put(("lost", wid))
        return
    for s in range(20):
        w.write({"type": "step", "step": s, "values": {"writer": float(wid)}})
    w.close({"steps": 20})
    out.put(("won", wid))


def racing_starts(tmp: str, races: int, racers: int) -> dict:
    import cockpit_lite

    ctx = multiprocessing.get_context("fork")
    mixed = bad_winners = 0
    for trial in range(races):
        logdir = os.path.join(tmp, f"race{trial}")
        barrier, out = ctx.Barrier(racers), ctx.Queue()
        procs = [ctx.Process(target=_racer, args=(logdir, barrier, i, out)) for i in range(racers)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        results = [out.get(timeout=10) for _ in procs]
        winners = [wid for kind, wid in results if kind == "won"]
        bad_winners += len(winners) != 1
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a bad or torn line is a mixed log too
                run = cockpit_lite.load(logdir, cache=False, strict=True)
            writers = set(run.series("writer")[1].tolist())
            ok = (run.finished and len(run.steps()) == 20 and len(writers) == 1
                  and run.header.get("writer") in winners and writers == {float(run.header["writer"])})
        except Exception:
            ok = False
        mixed += not ok
    return {"trials": races, "racers": racers, "mixed_logs": mixed, "trials_without_one_winner": bad_winners}


def malformed_values(tmp: str) -> dict:
    from cockpit_lite.cli import main
    from test_runlog_bad_input import BAD_LINES, _log
    from pathlib import Path

    import cockpit_lite

    rows = {}
    for i, (name, line) in enumerate(sorted(BAD_LINES.items())):
        folder = Path(tmp) / f"bad{i}"
        _log(folder, line)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = cockpit_lite.load(folder, cache=False)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = main(["plot", str(folder), "-o", str(folder / "out.png"), "--one-process",
                             "--instruments", "performance"])
        rows[name] = {"bad_lines": len(run.bad_lines), "line": run.bad_lines[0][0] if run.bad_lines else None,
                      "steps_read": len(run.steps()), "plot_exit": code, "png": (folder / "out.png").exists()}
    good = sum(r["bad_lines"] == 1 and r["line"] == 3 and r["steps_read"] == 2 and r["plot_exit"] == 0 and r["png"]
               for r in rows.values())
    return {"classes": len(rows), "one_reported_line_and_a_plot": good, "rows": rows}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--races", type=int, default=50)
    ap.add_argument("--racers", type=int, default=4)
    ap.add_argument("--soak", help="a JSON file written by benchmarks/memory_soak.py --json")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
               "full_disk": full_disk(tmp), "racing_starts": racing_starts(tmp, args.races, args.racers),
               "malformed_values": malformed_values(tmp)}
    if args.soak:
        with open(args.soak) as fh:
            out["soak"] = json.load(fh)
    if args.json:
        print(json.dumps(out))
        return out
    d, r, m = out["full_disk"], out["racing_starts"], out["malformed_values"]
    print(f"machine: {out['machine']}")
    print(f"{'check':28s} result")
    print(f"{'full disk (steps 20-59)':28s} training finished: {d['training_finished']}, log readable: "
          f"{d['log_readable']}, {d['steps_logged']} of 100 steps logged, {d['dropped_records']} dropped, "
          f"{d['warnings']} warning(s)")
    print(f"{'racing starts':28s} {r['mixed_logs']} of {r['trials']} trials ({r['racers']} processes each) mixed; "
          f"{r['trials_without_one_winner']} without exactly one winner")
    print(f"{'malformed values':28s} {m['one_reported_line_and_a_plot']} of {m['classes']} classes: one reported "
          "line, the rest read, a plot")
    for name, row in m["rows"].items():
        if not (row["bad_lines"] == 1 and row["plot_exit"] == 0 and row["png"]):
            print(f"{'':28s}   {name}: {row}")
    if "soak" in out:
        s = out["soak"]
        print(f"{'memory soak':28s} {s['model']}, batch {s['batch']}, {s['image']}px, {s['steps']} tracked steps "
              f"({s['preset']}), gc disabled: RSS growth {s['watched']['growth_mb']} MB watched, "
              f"{s['plain']['growth_mb']} MB plain; goal < {s['goal_mb']} MB: {'met' if s['within_goal'] else 'NOT met'}")
    return out


if __name__ == "__main__":
    main()
