"""The ``cockpit-lite`` command line.

    cockpit-lite plot LOGDIR [LOGDIR ...] -o cockpit.png [--instruments a,b] [--steps START:STOP]
    cockpit-lite summary LOGDIR
    cockpit-lite instruments            # the instruments available (built-in and third-party)
    cockpit-lite diagnose LOGDIR [--threshold name=value ...]   # the advisor's report

Each subcommand is a function ``cmd_<name>(args) -> exit code`` registered in ``build_parser``;
add a subcommand by adding a subparser there.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Optional, Sequence

from .gc_pause import gc_paused


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="cockpit-lite", description="Read and plot cockpit-lite run logs.")
    parser.add_argument("--version", action="version", version=f"cockpit-lite {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("plot", help="draw the dashboard of one run, or of several side by side",
                       description="Draw the dashboard of one or more runs into a PNG, PDF or SVG file.")
    p.add_argument("logdirs", nargs="+", metavar="LOGDIR", help="run folder(s) holding cockpit.jsonl (or the file)")
    p.add_argument("-o", "--output", required=True, help="output file: .png, .pdf or .svg (its folder must exist)")
    p.add_argument("--mkdir", action="store_true", help="create the output file's folder if it does not exist")
    p.add_argument("--instruments", help="comma-separated instrument names (see 'cockpit-lite instruments'); "
                                         "named instruments without data are shown greyed with the reason")
    p.add_argument("--steps", help="step range START:STOP (STOP excluded), START: or :STOP")
    p.add_argument("--title", help="figure title")
    p.add_argument("--dpi", type=int, default=100, help="resolution of a PNG (default 100)")
    p.add_argument("--one-process", action="store_true",
                   help="draw a PNG in this process only (default: its two halves at once, in this process "
                        "and a forked one, where there is more than one core)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress lines on stderr once the work takes more than 2 s (default: when stderr "
                        "is a terminal)")
    p.set_defaults(func=cmd_plot)

    s = sub.add_parser("summary", help="print a run's steps, quantities and last values")
    s.add_argument("logdir", metavar="LOGDIR")
    s.add_argument("--all-keys", action="store_true", help="also list per-parameter keys (name/param)")
    s.set_defaults(func=cmd_summary)

    i = sub.add_parser("instruments", help="list the available instruments (built-in and third-party)")
    i.add_argument("--json", action="store_true", help="print their JSON descriptions")
    i.set_defaults(func=cmd_instruments)

    d = sub.add_parser("diagnose", help="print the advisor's diagnoses of a run, with evidence and actions")
    d.add_argument("logdir", metavar="LOGDIR")
    d.add_argument("--threshold", action="append", default=[], metavar="NAME=VALUE",
                   help="override an advisor threshold (see cockpit_lite/advisor/thresholds.py); repeatable")
    d.add_argument("--json", action="store_true", help="print the diagnoses as JSON")
    d.set_defaults(func=cmd_diagnose)
    return parser


#: exit status of a command whose reader went away (``cockpit-lite summary RUN | head``): what a shell
#: reports for a process ended by SIGPIPE (128 + 13)
EXIT_BROKEN_PIPE = 141


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader of our output is gone: nothing to say, to no one
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except (FileNotFoundError, ValueError, OSError) as err:  # user errors: one clear line, no traceback
        print(f"cockpit-lite {args.command}: error: {err}", file=sys.stderr)
        return 2


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush of what is still buffered
    does not fail again (and print "Exception ignored ... BrokenPipeError") at exit."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real stdout (captured): nothing to flush
        pass


class NothingToPlot(ValueError):
    """A run log without step records, or a step range outside the run: no image is written."""


def check_output_folder(path, mkdir: bool) -> None:
    """The folder of ``-o`` must exist (a typo must not silently create a tree); ``--mkdir`` creates it."""
    from pathlib import Path

    folder = Path(path).parent
    if folder.is_dir():
        return
    if folder.exists():
        raise ValueError(f"cannot write {str(path)!r}: {str(folder)!r} is not a folder")
    if not mkdir:
        raise ValueError(f"cannot write {str(path)!r}: the folder {str(folder)!r} does not exist "
                         "(create it, or pass --mkdir)")
    folder.mkdir(parents=True, exist_ok=True)


def check_steps_in_range(views, steps_text) -> None:
    """Every run has step records, and some in the chosen range; else ``NothingToPlot`` saying which."""
    from .dashboard import _any_steps

    for v in views:
        in_range, _ = _any_steps(v)
        if in_range:
            continue
        where = getattr(getattr(v, "run", None), "path", v.label)
        all_steps = v.run.steps() if hasattr(v.run, "steps") else [r["step"] for r in getattr(v.run, "records", [])]
        if not len(all_steps):
            raise NothingToPlot(f"{where}: the log has no step records (nothing to plot; no image written)")
        raise NothingToPlot(f"{where}: no step records in --steps {steps_text} (the run has steps "
                            f"{int(all_steps[0])}..{int(all_steps[-1])}; no image written)")


def cmd_plot(args) -> int:
    from . import dashboard

    dashboard.output_format(args.output)  # refuse a bad suffix before loading anything
    check_output_folder(args.output, args.mkdir)
    names = [n.strip() for n in args.instruments.split(",") if n.strip()] if args.instruments else None
    if names is not None and not names:
        raise ValueError("--instruments is empty")
    from .progress import Progress
    from .runlog import load

    progress = Progress("cockpit-lite plot", enabled=args.progress)
    t0 = time.perf_counter()
    # The runs' records are a million objects for 100,000 steps, without reference cycles. Frozen
    # right after reading (kept out of the cyclic collector's scans; still freed as usual once
    # unused), they are not rescanned by the collections that matplotlib's allocations trigger
    # (~1.5 s for 100,000 steps).
    frozen = gc.get_freeze_count()
    with gc_paused():
        dashboard.parse_steps(args.steps)  # refuse a bad range before reading
        runs = []
        for i, logdir in enumerate(args.logdirs):
            progress.stage(f"reading {logdir} ({i + 1}/{len(args.logdirs)})")
            runs.append(load(logdir))
        views = dashboard._views(runs, args.steps)
        runs = []
        bad = bad_lines_text(getattr(v, "run", None) for v in views)
        try:
            check_steps_in_range(views, args.steps)
        except NothingToPlot:
            for line in bad:  # bad lines may be why a log looks empty
                print(line, file=sys.stderr)
            raise
        gc.freeze()
    try:
        progress.stage("choosing the panels")
        lay = dashboard.layout(views, names)
        progress.stage(f"drawing {len(lay.panels)} panels")
        fig = dashboard.figure(lay, title=args.title)
        progress.stage(f"writing {args.output}")
        dashboard.save(fig, args.output, dpi=args.dpi, two_processes=not args.one_process)
        panels = sum(1 for ax in fig.get_axes() if ax.get_visible() and ax.get_title())
    finally:
        # garbage cycles from drawing (tracebacks caught inside matplotlib keep their callers'
        # frames, and so the runs, alive): collected now, while the records are frozen and not
        # scanned, the runs are freed here instead of by a full scan of every record later
        views = fig = lay = None
        gc.collect()
        if not frozen:  # a caller that froze objects itself keeps them frozen
            gc.unfreeze()
    progress.done()
    print(f"wrote {args.output} ({panels} panels, {len(args.logdirs)} run(s), {time.perf_counter() - t0:.1f} s)")
    for line in bad:
        print(line)
    return 0


def bad_lines_text(runs) -> list:
    """One line per run with lines that were not valid records (skipped): which, and why."""
    out = []
    for run in runs:
        bad = getattr(run, "bad_lines", None)
        if bad:
            shown = "; ".join(f"line {n}: {why}" for n, why in bad[:5])
            more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
            out.append(f"warning: {run.path}: skipped {len(bad)} line(s) that are not valid records ({shown}{more})")
    return out


def cmd_diagnose(args) -> int:
    import json

    from .advisor import diagnose, report
    from .advisor.thresholds import parse
    from .runlog import load

    overrides = parse(args.threshold)  # the same check as diagnose() and watch(..., advisor={...})
    run = load(args.logdir)
    if args.json:
        print(json.dumps([d.to_json() for d in diagnose(run, overrides)], indent=2))
    else:
        print(report(run, overrides))
    return 0


def cmd_summary(args) -> int:
    from .runlog import load

    run = load(args.logdir)
    print(summary_text(run, all_keys=args.all_keys))
    for line in bad_lines_text([run]):
        print(line)
    return 0


def summary_text(run, all_keys: bool = False) -> str:
    """Steps, quantities and last values of ``run``, as plain text."""
    import numpy as np

    h = run.header
    steps = run.steps().tolist()  # not run.records: a run read from its cache answers without them
    lines = [f"run: {run.logdir}"]
    if h.get("synthetic"):
        lines.append("  (synthetic log: numbers not computed from a model)")
    what = ", ".join(f"{k}={h[k]}" for k in ("model", "optimizer", "loss_fn", "num_params") if h.get(k) is not None)
    if what:
        lines.append(f"  {what}")
    state = "finished" if run.finished else "running or interrupted"
    if run.torn_tail:
        state += ", torn last line ignored"
    span = f"{steps[0]}..{steps[-1]}" if steps else "none"
    lines.append(f"steps: {len(steps)} recorded (steps {span}), {len(run.skipped)} skipped, {state}")
    quantities = h.get("quantities") or {}
    if quantities:
        lines.append("quantities: " + ", ".join(
            f"{name} ({(spec or {}).get('schedule', '?')})" if isinstance(spec, dict) else name
            for name, spec in quantities.items()))
    keys = run.keys()
    shown = keys if all_keys else [k for k in keys if "/" not in k or _is_part(k)]
    hidden = len(keys) - len(shown)
    lines.append("last values:")
    width = max((len(k) for k in shown), default=10)
    for key in shown:
        s, v = run.series(key)
        finite = np.isfinite(v)
        if finite.any():
            i = int(np.flatnonzero(finite)[-1])
            text = f"{v[i]:.6g}  (step {s[i]})"
        else:
            text = "NaN on every step"
        nan = int((~finite).sum())
        if nan:
            reasons = run.reasons(key)
            why = f": {reasons[max(reasons)]}" if reasons else ""
            text += f"  [{nan} NaN{why}]"
        lines.append(f"  {key:<{width}}  {text}")
    data_keys = run.data_keys()
    if data_keys:
        lines.append("structures: " + ", ".join(f"{k} ({len(run.data(k))} steps)" for k in data_keys))
    if hidden:
        lines.append(f"({hidden} per-parameter keys not shown; --all-keys lists them)")
    return "\n".join(lines)


def _is_part(key: str) -> bool:
    """Summary parts of a quantity (``hess_trace/stderr``, ``lr/group1``) rather than per-parameter values."""
    from .runlog.keys import is_summary_part

    return is_summary_part(key) or key.split("/", 1)[1].startswith("group")


def cmd_instruments(args) -> int:
    import json

    from cockpit_lite import instruments

    found = instruments.discover()
    if args.json:
        print(json.dumps([i.describe() for i in found], indent=2))
        return 0
    width = max(len(i.name) for i in found)
    for group in instruments.GROUPS:
        members = [i for i in found if i.group == group]
        if members:
            print(f"{group}:")
            for i in members:
                print(f"  {i.name:<{width}}  {i.title}  [reads {', '.join(i.keys)}]")
    return 0


if __name__ == "__main__":  # python -m cockpit_lite.cli
    sys.exit(main())
