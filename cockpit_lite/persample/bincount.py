"""Exact histogram counts of float32 values on the CPU, in torch.histc's float32 bin arithmetic.

The bin of x over [-R, R] is ``trunc((x - (-R)) * bins / (2R))`` computed in float32 (the scalars rounded
to float32, as torch does), the top edge in the last bin. ``count_in_range`` reads each value once: per
chunk of ``STEP`` values it takes the chunk's min and max (so that the caller needs no separate pass for
max |x|), scales it to bin units in a reused scratch buffer, casts to int16 and runs ``torch.bincount``.
The int16 bin indices are counted in pairs (first half x (bins + 1) + second half, one bincount over
half as many codes, then the row and column sums: 6-10% faster than one index at a time). A chunk
holding values outside [-R, R] is counted as ``samples._histc`` always did (how many have
|x| > R, then the values clamped to [-R, R]), so clipping costs no second read either; a NaN or an
infinity stops the count (None) and the caller takes its general path. With ``negatives`` it also counts the
values below 0 (a comparison into the int16 buffer's memory), which ``samples._sign_split`` needs to put the
values next to 0 on their side of the middle edge, where the float32 arithmetic cannot.

Sign-exact arithmetic (even ``bins``, R <= bins / 2: ``exact_scale``): the bin of x is
``floor(fl(x * s)) + bins/2`` with the float32 scale s = fl((bins/2) / R) rounded down until fl(fl(R) * s) <= bins/2.
x * s keeps the sign of x, and with s >= 1 a nonzero product never rounds to 0, so every value below 0 lands left
of the middle edge and every other one right of it: no count of the negatives, no second comparison pass (the
difference, measured: 8M values 21.4 -> 14.3 ms, docs/benchmarks.md). |x| <= fl(R) gives |x * s| <= bins/2, so
the index lies in [0, bins], the top edge counted in the last bin as before. The edges are the same nominal
edges -R + k 2R/bins as the other arithmetic's, rounded differently by an ulp or so: a value within rounding of an
edge other than 0 may land in the neighbouring bin of the other kernel (the GPU's histc, ranges above bins / 2),
as values within rounding of an edge do between any two float32 kernels.

Why this equals the clamped int32 kernel (``samples._bin_counts``) for every value within [-R, R]: with
x >= fl(-R) the difference x - fl(-R) is >= 0 (rounding is monotone), and with x <= fl(R) the scaled value
is at most bins * (1 + 2^-23), so t lies in [0, bins + 1) and the int16 cast truncates exactly like the
int32 one; the clamp to bins - 1 becomes adding the count of index ``bins`` to the last bin. This needs R
far inside float32's normal range, and ``fast_range_ok`` checks the premise itself (t(-fl(R)) >= 0 and
t(fl(R)) < bins + 1) on every call; elsewhere the caller keeps the clamped kernel.

One thread (the caller's, with torch's intra-op threads for the elementwise ops; ``torch.bincount`` itself
is single-threaded): splitting the values over Python threads was measured and dropped (docs/benchmarks.md,
"Where the counting time goes"): after the OpenMP ops that build each block, torch's idle OpenMP workers
spin for milliseconds and take the cores from the helpers, so two ranges lost below 2^24 values and won
11-13% only from 2^25, more than the conv and linear blocks the quantity counts (at most 2^24 floats).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

# values per chunk (scratch: 16 MB float32 + 8 MB int16). Each chunk costs ~6 parallel regions; on a
# machine where other processes keep the cores busy every region waits for its descheduled threads, so
# fewer, larger chunks: 8M values beside 3 busy torch processes took 3.3 s with 2^18, 0.24 s with 2^22
# (the old kernel 0.76 s); quiet, all sizes from 2^18 to 2^22 are within 7% (docs/benchmarks.md)
STEP = 1 << 22
_INF = float("inf")
PAIRS = True


@functools.lru_cache(maxsize=64)  # one R per step, shared by every parameter
def fast_range_ok(R: float, bins: int) -> bool:
    """Whether ``count_in_range``'s premise holds for this R: no overflow or subnormal scaling in float32,
    and -fl(R), fl(R) (hence every value between, the ops being monotone) scaled into [0, bins + 1)."""
    if not (1e-30 < R < 1e30 and 0 < bins <= 30000):
        return False
    t = torch.tensor([-R, R], dtype=torch.float32).sub_(-R).mul_(bins).div_(2 * R)
    return 0.0 <= float(t[0]) and float(t[1]) < bins + 1


@functools.lru_cache(maxsize=64)
def exact_scale(R: float, bins: int) -> Optional[float]:
    """The float32 scale s of the sign-exact arithmetic (module docstring), or None where it does not apply: odd
    ``bins``, R outside float32's normal band, or s < 1 (R above bins / 2: a product could round to 0)."""
    if bins % 2 or not (1e-30 < R < 1e30 and 0 < bins <= 30000):
        return None
    h = torch.tensor(float(bins // 2), dtype=torch.float32)
    Rf = torch.tensor(R, dtype=torch.float32)
    s = h / Rf
    while bool(Rf * s > h):
        s = torch.nextafter(s, torch.zeros((), dtype=torch.float32))
    return float(s) if float(s) >= 1.0 else None


def _count(flat: torch.Tensor, R: float, bins: int, negatives: bool):
    """(counts [bins + 1], min, max, values below 0, clipped), chunk by chunk; None at the first chunk holding
    a NaN or an infinity. With ``negatives`` and the sign-exact arithmetic (``exact_scale``), the values below 0
    are None: the counts already split them at 0."""
    n = flat.numel()
    counts = torch.zeros(bins + 1, dtype=torch.int64)
    lo_all, hi_all, neg, clipped = _INF, -_INF, 0, 0
    scale = exact_scale(R, bins) if negatives else None  # the signs then come out of the arithmetic itself
    if scale is not None:
        negatives, neg = False, None
    shift = bins // 2 if scale is not None else 0  # index = floor(x * s) + bins/2
    m0 = min(STEP, n)
    t_buf, q_buf = torch.empty(m0), torch.empty(m0, dtype=torch.int16)
    B1 = bins + 1
    pairs = PAIRS and B1 * B1 <= 32767  # the codes stay int16
    code_buf = torch.empty(m0 // 2, dtype=torch.int16) if pairs else None
    for s in range(0, n, STEP):
        m = min(STEP, n - s)
        x = flat[s:s + m]
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (-_INF < lo and hi < _INF):  # NaN fails both
            return None
        lo_all, hi_all = min(lo_all, lo), max(hi_all, hi)
        q = q_buf[:m]
        if negatives:  # in q's memory, free until the cast below (a uint8 sum: 15% faster than count_nonzero)
            below = torch.lt(x, 0.0, out=q.view(torch.bool)[:m])
            neg += int(below.view(torch.uint8).sum(dtype=torch.int32))
        if lo < -R or hi > R:  # as samples._histc did for the whole tensor: count outside, clamp
            mask = q.view(torch.bool)[:m]  # q's memory, free until the cast below: no fresh |x| or mask copy
            # (count_nonzero: a bool .sum() converts the mask to int64 first, 8 bytes per value, fresh memory)
            clipped += int(torch.count_nonzero(torch.gt(x, R, out=mask)))
            clipped += int(torch.count_nonzero(torch.lt(x, -R, out=mask)))
            t = torch.clamp(x, -R, R, out=t_buf[:m])
            t = t.mul_(scale).floor_() if scale is not None else t.sub_(-R).mul_(bins).div_(2 * R)
        elif scale is not None:
            t = torch.mul(x, scale, out=t_buf[:m]).floor_()
        else:
            t = torch.sub(x, -R, out=t_buf[:m]).mul_(bins).div_(2 * R)
        q.copy_(t)
        h = m // 2 if pairs else 0
        if h:  # bincount's serial loop over half as many codes, first half x B1 + second half
            code = torch.add(q[h:2 * h], q[:h], alpha=B1, out=code_buf[:h])
            if shift:
                code.add_(shift * (B1 + 1))
            c = torch.bincount(code, minlength=B1 * B1).view(B1, B1)
            counts += c.sum(0)
            counts += c.sum(1)
        if 2 * h < m:
            rest = q[2 * h:]
            counts += torch.bincount(rest.to(torch.int64) + shift if shift else rest, minlength=B1)
    return counts, lo_all, hi_all, neg, clipped


def count_in_range(G: torch.Tensor, R: float, bins: int, negatives: bool = False
                   ) -> Optional[Tuple[torch.Tensor, float, float, int, int]]:
    """(counts int64 [bins], min, max, number of values below 0, number outside [-R, R]) of the float32 CPU
    tensor G, values outside [-R, R] counted in the edge bins; None when a value is NaN or infinite.
    Values below 0 are counted only with ``negatives``; where the sign-exact arithmetic applies they are None
    instead, the counts being split at 0 already. Requires ``fast_range_ok(R, bins)``."""
    r = _count(G.reshape(-1), R, bins, negatives)
    if r is None:
        return None
    counts, lo, hi, neg, clipped = r
    counts[bins - 1] += counts[bins]  # t == bins (the top edge) and rounding just above it
    return counts[:bins], lo, hi, neg, clipped
