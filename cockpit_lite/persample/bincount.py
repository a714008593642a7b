"""Exact histogram counts of float32 values on the CPU, in torch.histc's float32 bin arithmetic.

The bin of x over [-R, R] is ``trunc((x - (-R)) * bins / (2R))`` computed in float32 (the scalars rounded
to float32, as torch does), the top edge in the last bin. ``count_in_range`` reads each value once: per
chunk of ``STEP`` values it takes the chunk's min and max (so that the caller needs no separate pass for
max |x|), scales it to bin units in a reused scratch buffer, casts to int16 and runs ``torch.bincount``.
A chunk holding values outside [-R, R] is counted as ``samples._histc`` always did (how many have
|x| > R, then the values clamped to [-R, R]), so clipping costs no second read either; a NaN or an
infinity stops the count (None) and the caller takes its general path.

Why this equals the clamped int32 kernel (``samples._bin_counts``) for every value within [-R, R]: with
x >= fl(-R) the difference x - fl(-R) is >= 0 (rounding is monotone), and with x <= fl(R) the scaled value
is at most bins * (1 + 2^-23), so t lies in [0, bins + 1) and the int16 cast truncates exactly like the
int32 one; the clamp to bins - 1 becomes adding the count of index ``bins`` to the last bin. This needs R
far inside float32's normal range (``fast_range_ok``); elsewhere the caller keeps the clamped kernel.

``torch.bincount`` is single-threaded on the CPU, so with ``torch.get_num_threads()`` = T > 1 and at least
2 x ``MIN_PER_WORKER`` values, the values are split into min(T, ``MAX_WORKERS``) ranges counted
concurrently in helper threads (torch ops release the GIL) and summed, the caller waiting. Each helper
runs its torch ops single-threaded (its own OpenMP setting, see the pool below), so T helpers keep T cores
busy instead of T thread teams competing for them. The helpers are daemon threads of one pool created on
first use and reused (re-created in a forked child); callers from several threads share it safely.
"""

from __future__ import annotations

import ctypes
import os
import queue
import threading
from concurrent.futures import Future
from typing import List, Optional, Tuple

import torch

STEP = 1 << 18  # values per chunk: the scratch (1 MB float32 + 0.5 MB int16 per thread) stays in cache
MAX_WORKERS = 8  # concurrent ranges at most, whatever torch.get_num_threads() says
MIN_PER_WORKER = 1 << 23  # below this many values per range, one thread (see the note at the pool)
_INF = float("inf")


def fast_range_ok(R: float, bins: int) -> bool:
    """Whether ``count_in_range``'s proof holds for this R (no overflow or subnormal scaling in float32)."""
    return 1e-30 < R < 1e30 and 0 < bins <= 30000


def zero_bin(R: float, bins: int) -> int:
    """The bin the float32 arithmetic gives to an exact zero (not always bins // 2)."""
    t = float(torch.zeros(1).sub_(-R).mul_(bins).div_(2 * R)[0])
    return min(max(int(t), 0), bins - 1)


class _Result:
    __slots__ = ("counts", "lo", "hi", "zeros", "clipped", "not_finite")

    def __init__(self, bins: int):
        self.counts = torch.zeros(bins + 1, dtype=torch.int64)
        self.lo, self.hi, self.zeros, self.clipped, self.not_finite = float("inf"), float("-inf"), 0, 0, False


def _count_range(flat: torch.Tensor, R: float, bins: int, zeros: bool, stop: threading.Event) -> _Result:
    """Counts of one contiguous range; stops (``not_finite``) at the first chunk holding a NaN or inf."""
    res = _Result(bins)
    n = flat.numel()
    if n == 0:
        return res
    step = STEP
    m0 = min(step, n)
    t_buf, q_buf = torch.empty(m0), torch.empty(m0, dtype=torch.int16)
    for s in range(0, n, step):
        if stop.is_set():
            break
        m = min(step, n - s)
        x = flat[s:s + m]
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (-_INF < lo and hi < _INF):  # NaN fails both
            res.not_finite = True
            stop.set()
            break
        res.lo, res.hi = min(res.lo, lo), max(res.hi, hi)
        if zeros:
            res.zeros += m - int(torch.count_nonzero(x))
        if lo < -R or hi > R:  # as samples._histc did for the whole tensor: count outside, clamp
            res.clipped += int((x.abs() > R).sum())
            t = torch.clamp(x, -R, R, out=t_buf[:m]).sub_(-R)
        else:
            t = torch.sub(x, -R, out=t_buf[:m])
        t.mul_(bins).div_(2 * R)
        q = q_buf[:m]
        q.copy_(t)
        c = torch.bincount(q, minlength=bins + 1)
        res.counts += c[:bins + 1]
        if c.numel() > bins + 1:  # not reached for values within [-R, R]; kept exact all the same
            res.counts[bins] += c[bins + 1:].sum()
    return res


def count_in_range(G: torch.Tensor, R: float, bins: int, zeros: bool = False
                   ) -> Optional[Tuple[torch.Tensor, float, float, int, int]]:
    """(counts int64 [bins], min, max, number of exact zeros, number outside [-R, R]) of the float32 CPU
    tensor G, values outside [-R, R] counted in the edge bins; None when a value is NaN or infinite.
    Exact zeros are counted only with ``zeros``. Requires ``fast_range_ok(R, bins)``."""
    flat = G.reshape(-1)
    n = flat.numel()
    parts = max(1, min(torch.get_num_threads(), MAX_WORKERS, n // MIN_PER_WORKER))
    stop = threading.Event()
    if parts > 1:
        try:
            serial = _start_helpers(parts)  # helpers whose torch ops run single-threaded take every range
        except RuntimeError:  # no new thread (interpreter shutting down): count here
            parts = 1
    if parts == 1:
        results = [_count_range(flat, R, bins, zeros, stop)]
    else:
        if not serial:  # their ops would start thread teams of their own: two ranges, one of them here
            parts = 2
        per = -(-n // parts)
        first = 0 if serial else 1
        futures = [_submit(_count_range, flat[i * per:(i + 1) * per], R, bins, zeros, stop)
                   for i in range(first, parts)]
        results = [] if serial else [_count_range(flat[:per], R, bins, zeros, stop)]
        results += [f.result() for f in futures]
    if any(r.not_finite for r in results):
        return None
    counts = results[0].counts
    for r in results[1:]:
        counts += r.counts
    counts[bins - 1] += counts[bins]  # t == bins (the top edge) and rounding just above it
    return (counts[:bins], min(r.lo for r in results), max(r.hi for r in results),
            sum(r.zeros for r in results), sum(r.clipped for r in results))


# ---- one small pool of daemon threads, created on first use, shared by all callers ----
# Each helper sets its own OpenMP thread count to 1 (a per-thread setting; torch's global one is left
# alone), so that P helpers use P cores instead of P thread teams competing for them.

_lock = threading.Lock()
_queue: "queue.SimpleQueue" = queue.SimpleQueue()
_threads: List[threading.Thread] = []
_serial: List[bool] = []  # per started helper: whether its torch ops run single-threaded


def _omp_set_num_threads():
    """The OpenMP runtime's omp_set_num_threads (the copy torch loaded), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "omp" in line and ".so" in line})
        for path in paths:
            if os.path.basename(path).startswith(("libgomp", "libiomp", "libomp")):
                return ctypes.CDLL(path).omp_set_num_threads
    except (OSError, AttributeError, IndexError):
        pass
    return None


def _work(q: "queue.SimpleQueue", started: threading.Event) -> None:
    try:
        torch.get_num_threads()  # torch's own per-thread set-up first (it would undo what follows)
        set_threads = _omp_set_num_threads()
        if set_threads is not None:
            set_threads(1)
        _serial.append(torch.get_num_threads() == 1)
    except Exception:
        _serial.append(False)
    started.set()
    while True:
        future, fn, args = q.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to the caller, who raises it
                future.set_exception(e)
        del future, fn, args


def _start_helpers(n: int) -> bool:
    """At least ``n`` helper threads (MAX_WORKERS at most); whether they all run torch ops
    single-threaded."""
    with _lock:
        alive = [t for t in _threads if t.is_alive()]
        if len(alive) < len(_threads):
            _threads[:] = alive
        while len(_threads) < min(n, MAX_WORKERS):
            started = threading.Event()
            t = threading.Thread(target=_work, args=(_queue, started), name="cockpit-lite-bincount", daemon=True)
            t.start()
            started.wait()
            _threads.append(t)
        return bool(_serial) and all(_serial)


def _submit(fn, *args) -> Future:
    """Runs fn(*args) in a helper thread. Helpers wait on nothing, so concurrent callers cannot
    deadlock."""
    future: Future = Future()
    _queue.put((future, fn, args))
    return future


def _after_fork_in_child() -> None:  # the parent's helper threads do not exist in a forked child
    global _lock, _queue
    _lock, _queue = threading.Lock(), queue.SimpleQueue()
    _threads.clear()
    _serial.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
