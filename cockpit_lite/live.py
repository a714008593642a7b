"""Live mode: a dashboard PNG refreshed in place while training runs, without blocking a step.

    live = LiveDashboard("runs/exp1", "runs/exp1/cockpit.png", interval_s=10)
    live.start()
    ...  # training writes runs/exp1/cockpit.jsonl
    live.stop()   # one last render of the finished log, then the renderer exits

The renderer is a separate program, started with ``subprocess``::

    python -m cockpit_lite.live LOGDIR PNG --interval 10 --parent PID

so drawing never holds the training process's GIL, and nothing of the user's script runs again in it
(``multiprocessing``'s spawn re-imported the user's ``__main__``: a script without an
``if __name__ == "__main__":`` guard trained a second time inside the renderer, which made a stray run
folder, failed, and never drew). It is niced where the OS allows, reads only the log file
(incrementally, with ``Run.refresh``) and redraws when new records arrived, every ``interval_s``
seconds (counted from the start of the previous render). It exits when asked (a ``stop`` line on its
standard input, after a last render), and on its own when the training process is gone (its standard
input closes, or its parent pid changes): it never outlives a killed trainer.

Frames came every ~80 s with a 10 s interval before, measured: the renderer also waited
render-CPU-seconds / (cpu_share x CPUs) after each render, with a 1 % default share; a render of
the demo's log takes 0.7-1.6 CPU s, which on 2 cores is 37-80 s. That budget is now opt-in
(``cpu_share=0.01`` keeps the renderer at about 1 % of the machine on average, for CPU training
that keeps every core busy: measured on the 2-core CNN benchmark, the step time grows by about twice
the renderer's share); by default the interval asked for is the pace. It draws with Agg and writes
the PNG atomically (a temporary file, then ``os.replace``): a viewer never sees a half-written
image. ``mode="thread"`` runs the same loop in a daemon thread instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence, Union


class LiveDashboard:
    def __init__(self, logdir: Union[str, os.PathLike], png_path: Union[str, os.PathLike], *,
                 interval_s: float = 10.0, instruments: Optional[Sequence[str]] = None, mode: str = "process",
                 nice: int = 10, dpi: int = 80, cpu_share: Optional[float] = None):
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if cpu_share is not None and not 0 < cpu_share <= 1:
            raise ValueError(f"cpu_share must be None or in (0, 1], got {cpu_share}")
        if mode not in ("process", "thread"):
            raise ValueError(f"mode must be 'process' or 'thread', got {mode!r}")
        if Path(png_path).suffix.lower() != ".png":
            raise ValueError(f"live mode writes a PNG; {str(png_path)!r} does not end in .png")
        self.logdir = os.path.abspath(logdir)
        self.png_path = os.path.abspath(png_path)
        self.interval_s = float(interval_s)
        self.instruments = list(instruments) if instruments is not None else None
        self.mode = mode
        self.nice = nice
        self.dpi = dpi
        self.cpu_share = cpu_share
        self._worker = None  # a subprocess.Popen (process mode) or a threading.Thread
        self._stop = None
        self._reader = None  # process mode: the thread that reads the renderer's reports
        self._renders = _Counter()
        self._errors = _ListQueue()

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> "LiveDashboard":
        if self._worker is not None:
            raise RuntimeError("this live dashboard is already started")
        if self.mode == "process":
            self._worker = subprocess.Popen(
                self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                env=_child_env(), close_fds=True)
            self._reader = threading.Thread(target=self._read_reports, name="cockpit-lite-live-reports", daemon=True)
            self._reader.start()
        else:
            self._stop = threading.Event()
            self._worker = threading.Thread(
                target=_serve, name="cockpit-lite-live", daemon=True,
                args=(self.logdir, self.png_path, self.interval_s, self.instruments, self.dpi, self.cpu_share,
                      self._stop, self._rendered, self._errors.put, None))
            self._worker.start()
        return self

    def command(self) -> List[str]:
        """The renderer's command line (process mode)."""
        cmd = [sys.executable, "-m", "cockpit_lite.live", self.logdir, self.png_path,
               "--interval", repr(self.interval_s), "--dpi", str(self.dpi), "--nice", str(self.nice),
               "--parent", str(os.getpid())]
        if self.instruments is not None:
            cmd += ["--instruments", ",".join(self.instruments)]
        if self.cpu_share is not None:
            cmd += ["--cpu-share", repr(self.cpu_share)]
        return cmd

    @property
    def pid(self) -> Optional[int]:
        """The renderer's process id (process mode, while started)."""
        return self._worker.pid if isinstance(self._worker, subprocess.Popen) else None

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the renderer for a last render of the log as it is now, wait for it, and end it."""
        if self._worker is None:
            return
        worker, self._worker = self._worker, None
        if isinstance(worker, subprocess.Popen):
            try:
                worker.stdin.write(b"stop\n")
                worker.stdin.close()
            except OSError:  # it has exited already
                pass
            try:
                worker.wait(timeout)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(5)
            self._reader.join(5)
        else:
            self._stop.set()
            worker.join(timeout)

    @property
    def running(self) -> bool:
        w = self._worker
        if isinstance(w, subprocess.Popen):
            return w.poll() is None
        return w is not None and w.is_alive()

    @property
    def renders(self) -> int:
        """How many times the PNG was written."""
        return int(self._renders.value)

    def errors(self) -> List[str]:
        """Errors the renderer met (it keeps going after each)."""
        out = []
        while True:
            try:
                out.append(self._errors.get_nowait())
            except IndexError:
                return out

    def _rendered(self) -> None:
        self._renders.value += 1

    def _read_reports(self) -> None:
        """Process mode: count the renderer's renders and keep its errors (one JSON report a line)."""
        for line in self._worker.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if report.get("rendered"):
                self._rendered()
            elif "error" in report:
                self._errors.put(str(report["error"]))

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class _Counter:
    def __init__(self):
        self.value = 0


class _ListQueue:
    def __init__(self):
        self._items: List[str] = []
        self._lock = threading.Lock()

    def put(self, item):
        with self._lock:
            self._items.append(item)

    def get_nowait(self):
        with self._lock:
            if not self._items:
                raise IndexError("empty")
            return self._items.pop(0)


def _child_env() -> dict:
    """The environment of the renderer: this process's, with the folder that holds this
    ``cockpit_lite`` (with its ``instruments``) first on the path, so that it imports the same code."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pause_after(render_cpu_s: float, interval_s: float, cpu_share: Optional[float], cpus: int,
                render_wall_s: float = 0.0) -> float:
    """Seconds to wait after a render before the next: the rest of ``interval_s`` (counted from the
    render's start), and with a ``cpu_share``, long enough that the renderer's CPU time stays below
    that share of the machine's CPUs on average."""
    pause = max(0.0, interval_s - render_wall_s)
    if cpu_share is not None:
        pause = max(pause, render_cpu_s / (cpu_share * max(1, cpus)))
    return pause


class _Stop:
    """Process mode: when the renderer must stop. ``wait(t)`` returns True once a ``stop`` line came on
    standard input (a last render is wanted) or the trainer is gone (``orphaned``: no last render):
    its standard input closed, or this process's parent is no longer ``parent``."""

    def __init__(self, parent: Optional[int]):
        self.parent = parent
        self.orphaned = False
        self._event = threading.Event()
        threading.Thread(target=self._read_stdin, name="cockpit-lite-live-stdin", daemon=True).start()

    def _read_stdin(self) -> None:
        try:
            for line in sys.stdin.buffer:
                if line.strip() == b"stop":
                    self._event.set()
                    return
        except (OSError, ValueError):
            pass
        self.orphaned = True  # end of input without "stop": the trainer is gone
        self._event.set()

    def _parent_gone(self) -> bool:
        if self.parent is not None and os.getppid() != self.parent:
            self.orphaned = True
        return self.orphaned

    def wait(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            if self._event.wait(min(max(end - time.monotonic(), 0.0), 0.5)) or self._parent_gone():
                return True
            if time.monotonic() >= end:
                return False


def _serve(logdir, png_path, interval_s, instruments, dpi, cpu_share, stop, rendered, report_error, nice) -> None:
    """The renderer loop: wait for the log, then redraw when it grew, every ``interval_s`` (see
    ``pause_after``); ``rendered()`` after each PNG written, ``report_error(text)`` for each distinct error."""
    if nice:
        try:
            os.nice(nice)
        except (AttributeError, OSError):
            pass
    import warnings

    warnings.simplefilter("ignore")  # a growing log's torn last line is expected here
    run = None
    drawn_records = -1
    last_error = None
    cpus = cpu_count()
    pause = min(interval_s, 0.5)  # until the log appears, look for it often
    while True:
        stopping = stop.wait(pause)
        if getattr(stop, "orphaned", False):
            return  # the trainer is gone: no last render
        try:
            if run is None:
                from .runlog import LOG_NAME, Run

                if not os.path.exists(os.path.join(logdir, LOG_NAME)):
                    if stopping:
                        return
                    continue
                run = Run(logdir)
            else:
                run.refresh()
            n = len(run) + len(run.skipped) + (run.footer is not None)
            pause = interval_s
            if n != drawn_records:
                cpu, wall = time.thread_time(), time.monotonic()
                _render(run, png_path, instruments, dpi)
                pause = pause_after(time.thread_time() - cpu, interval_s, cpu_share, cpus, time.monotonic() - wall)
                drawn_records = n
                rendered()
        except Exception as err:
            message = f"{type(err).__name__}: {err}"
            if message != last_error:  # report each distinct error once, not at every retry
                report_error(f"{message}\n{traceback.format_exc(limit=3)}")
                last_error = message
        if stopping:
            return


def _render(run, png_path, instruments, dpi) -> None:
    from . import dashboard

    fig = dashboard.render(run, instruments=instruments)
    dashboard.save(fig, png_path, dpi=dpi)


def _report(**fields) -> None:
    """One JSON line to the trainer (``LiveDashboard._read_reports``); nothing if it is gone."""
    try:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cockpit_lite.live LOGDIR PNG ...``: the renderer of ``LiveDashboard`` (process mode)."""
    p = argparse.ArgumentParser(prog="python -m cockpit_lite.live",
                                description="Render a run's dashboard into a PNG while the run grows.")
    p.add_argument("logdir")
    p.add_argument("png")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between renders (default 10)")
    p.add_argument("--instruments", help="comma-separated instrument names")
    p.add_argument("--dpi", type=int, default=80)
    p.add_argument("--cpu-share", type=float, default=None, help="cap the renderer's average CPU share")
    p.add_argument("--nice", type=int, default=10)
    p.add_argument("--parent", type=int, default=None,
                   help="exit when this process (the trainer) is no longer the parent")
    args = p.parse_args(argv)
    instruments = [n for n in args.instruments.split(",") if n] if args.instruments else None
    stop = _Stop(args.parent)
    _serve(args.logdir, args.png, args.interval, instruments, args.dpi, args.cpu_share, stop,
           lambda: _report(rendered=True), lambda text: _report(error=text), args.nice)
    return 0


if __name__ == "__main__":  # python -m cockpit_lite.live
    sys.exit(main())
