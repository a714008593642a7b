"""The CPU histogram count (``samples._histc`` and ``persample/bincount.py``) against an independent
reference: the float32 bin arithmetic emulated in numpy float64 (each op rounded to float32), truncated and
clamped to the edge bins, values below 0 left of the middle edge and the others right of it (even bins), clipped
values at the edges.

The chunk size is shrunk so that small inputs cross chunk boundaries.
"""

import threading

import numpy as np
import pytest
import torch

from cockpit_lite.persample import bincount
from cockpit_lite.persample import samples
from cockpit_lite.persample.samples import _histc

BINS = 100


def f32(a):
    return np.asarray(a, dtype=np.float64).astype(np.float32).astype(np.float64)


def exact_scale(R: float, bins: int):
    """The sign-exact arithmetic's scale (bincount.py's docstring): float32 (bins/2)/R, rounded down until
    fl(fl(R) s) <= bins/2; None for odd bins or s < 1 (then the histc arithmetic applies)."""
    if bins % 2:
        return None
    h, Rf = np.float32(bins // 2), np.float32(R)
    s = np.float32(h / Rf)
    while np.float32(Rf * s) > h:
        s = np.nextafter(s, np.float32(0))
    return s if s >= 1 else None


def reference(x: torch.Tensor, R: float, bins: int = BINS):
    """(counts, max |x|, clipped) of the float32 values of x (finite), computed independently: the float32 bin
    arithmetic the counting kernel uses there (sign-exact floor(x s) + bins/2 for even bins with R <= bins/2 in
    the fast band, else histc's (x + R) bins / 2R truncated), emulated in numpy."""
    v = x.detach().float().reshape(-1).numpy().astype(np.float64)
    Rf = float(np.float32(R))
    m = float(np.abs(v).max()) if v.size else 0.0
    clipped = int((np.abs(v) > Rf).sum()) if m > R else 0
    if m > R:
        v = np.clip(v, -Rf, Rf)
    s = exact_scale(R, bins) if bincount.fast_range_ok(R, bins) else None
    if s is not None:
        t = np.floor(f32(v * np.float64(s))) + bins // 2
    else:
        t = f32(v - f32(-R))  # float32 ops: exact in float64, then rounded to float32
        t = f32(t * f32(bins))
        t = np.trunc(f32(t / f32(2 * R)))
    idx = np.clip(t, 0, bins - 1).astype(np.int64)
    if bins % 2 == 0:  # every value below 0 left of the middle edge (0), every other one right of it
        mid = bins // 2
        idx[(v < 0) & (idx >= mid)] = mid - 1
        idx[(v >= 0) & (idx < mid)] = mid
    return np.bincount(idx, minlength=bins).astype(np.float64), m, clipped


def check(x, R, bins=BINS):
    counts, m, k = _histc(x, R, bins)
    rc, rm, rk = reference(x, R, bins)
    assert counts.dtype == torch.float64 and counts.shape == (bins,)
    np.testing.assert_array_equal(counts.numpy(), rc)
    assert m == rm and k == rk


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(bincount, "STEP", 1000)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 999, 1000, 1001, 4999, 5000, 12345, 40000])
def test_random_values_every_size_and_torch_thread_count(threads, n):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(n)
    for scale in (1e-6, 1e-3, 1.0, 1e4):
        x = torch.randn(n, generator=g) * scale
        m = float(x.abs().max())
        for R in (m, 1.05 * m, m * (1 + 1e-7), float(np.nextafter(np.float32(m), np.float32(0))), 0.5 * m):
            check(x, R)


@pytest.mark.parametrize("threads", [1, 2])
def test_values_on_every_bin_edge_and_next_to_it(threads):
    torch.set_num_threads(threads)
    for R in (1.0, 0.1, 3e-5, 7.3, 1 / 3, 2.0 ** -20, 123456.7):
        Rf = np.float32(R)
        edges = (np.float32(-R) + np.arange(BINS + 1, dtype=np.float32) * (np.float32(2) * Rf / np.float32(BINS)))
        edges = np.clip(edges, -Rf, Rf)
        vals = np.concatenate([edges, np.nextafter(edges, np.float32(np.inf)), np.nextafter(edges, np.float32(-np.inf)),
                               [-Rf, Rf, np.nextafter(Rf, np.float32(0)), np.nextafter(-Rf, np.float32(0)), 0.0, -0.0]])
        x = torch.from_numpy(np.tile(vals.astype(np.float32), 40))  # crosses chunks and threads
        check(x, R)
        check(x, float(Rf))


def ulp_neighbourhoods(centres, k: int) -> np.ndarray:
    """The float32 values whose bit patterns lie within k of each float32 centre's (consecutive values;
    non-finite patterns dropped)."""
    bits = np.asarray(centres, dtype=np.float32).view(np.int32).astype(np.int64)
    v = np.concatenate([np.arange(b - k, b + k + 1) for b in bits])
    v = v[(v >= np.iinfo(np.int32).min) & (v <= np.iinfo(np.int32).max)].astype(np.int32).view(np.float32)
    return v[np.isfinite(v)]


@pytest.mark.parametrize("R", [1.0, 0.3, 2.0 ** -7, 5e-4 * (1 + 2 ** -30), 77.7])
def test_thousands_of_float32_values_around_every_bin_edge(R):
    edges = -R + np.arange(BINS + 1) * (2 * R / BINS)  # exact edges, then the float32 values near them
    x = torch.from_numpy(ulp_neighbourhoods(np.concatenate([edges, [0.0, -0.0]]), 2048))
    check(x, R)


def test_range_not_representable_in_float32_either_way():
    for R in (0.1, 0.3, 1e-3 * (1 + 2 ** -30), 1e-3 * (1 - 2 ** -30), 5e7 + 1.5):
        Rf = np.float32(R)
        x = torch.tensor([-Rf, Rf, 0.0, Rf / 2, -Rf / 3] * 1200, dtype=torch.float32)
        check(x, R)


@pytest.mark.parametrize("threads", [1, 2])
def test_exact_zeros_and_many_equal_values(threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g)
    x[torch.rand(20000, generator=g) < 0.6] = 0.0  # ReLU-like
    x[:3000] = 0.25
    for R in [float(x.abs().max()) * f for f in (1.0, 1.01, 0.37)] + [0.1 * k for k in range(1, 40)]:
        check(x, R)
    check(torch.zeros(9001), 1e-12)
    check(torch.full((9001,), 1e-12), 1e-12)


def _zero_bin(R: float, bins: int) -> int:
    """The bin the float32 arithmetic gives to an exact zero (not always bins // 2)."""
    t = float(torch.zeros(1).sub_(-R).mul_(bins).div_(2 * R)[0])
    return min(max(int(t), 0), bins - 1)


def test_every_zero_bin_case_is_moved_to_the_middle_bin():
    # some R put exact zeros one bin low in float32 (t(0) just under bins/2): both cases must be covered
    Rs = [float(r) for r in np.geomspace(1e-9, 1e6, 400)]
    low = [R for R in Rs if _zero_bin(R, BINS) != BINS // 2]
    assert low and len(low) < len(Rs)
    x = torch.tensor([0.0] * 3001 + [1e-30, -1e-30], dtype=torch.float32)
    for R in low[:5] + [R for R in Rs if R not in low][:5]:
        check(x * R * 1e25, R)


@pytest.mark.parametrize("threads", [1, 2])
def test_values_next_to_zero_are_counted_on_their_side(threads):
    """A saturated softmax's gradients: many values within R * 2^-24 of 0, where x + R rounds to R in float32.
    Exact binning (float64, no edge nearby but 0): below 0 in the bin left of 0, the others right of it. Was:
    every tiny negative value in the bin [0, 2R/bins)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(5)
    tiny = (torch.rand(30000, generator=g) - 0.5) * 2e-7
    tiny[:500] = 0.0
    x = torch.cat([tiny, torch.tensor([0.7, -0.7])])
    for R in (0.7, 1.0, 3.3):
        counts, _, _ = _histc(x, R, BINS)
        assert counts[BINS // 2 - 1] == int((x < 0).sum()) - 1  # -0.7 is far left
        assert counts[BINS // 2] == int((x >= 0).sum()) - 1
        check(x, R)
    for bins in (2, 10, 180):  # the GPU's and the wide ranges' kernel (torch.histc / int32 bincount) alike
        counts, _, _ = samples._histc_clamped(x, 1.0, bins)
        assert counts[bins // 2 - 1] + counts[: bins // 2 - 1].sum() == int((x < 0).sum())


@pytest.mark.parametrize("threads", [1, 2])
def test_values_outside_the_range_are_clipped_into_the_edge_bins(threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30000, generator=g)
    for R in (0.01, 0.5, 1.0, 2.5):
        check(x, R)
    x[29999] = 1e30  # an outlier only in the last chunk
    check(x, 1.0)


def test_non_finite_values_give_a_non_finite_max_and_no_crash():
    x = torch.randn(12000)
    x[11000] = float("nan")
    counts, m, _ = _histc(x, 1.0, BINS)
    assert m != m and counts.shape == (BINS,)
    x[11000] = float("inf")
    counts, m, k = _histc(x, 1.0, BINS)
    assert m == float("inf") and k >= 1 and counts.sum() == x.numel()


@pytest.mark.parametrize("R", [1e-35, 1e35])
def test_ranges_outside_the_fast_band_use_the_clamped_kernel(R):
    assert not bincount.fast_range_ok(R, BINS)
    x = (torch.rand(5000) * 2 - 1) * float(np.float32(R))
    check(x, R)


@pytest.mark.parametrize("bins", [1, 2, 7, 99, 180, 181, 1000])
def test_other_bin_counts_with_and_without_pair_codes(bins):
    g = torch.Generator().manual_seed(bins)
    x = torch.randn(12345, generator=g)
    x[:100] = 0
    for R in (float(x.abs().max()), 1.3, 0.7):
        check(x, R, bins)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_counted_as_their_float32_values(dtype):
    torch.set_num_threads(2)
    x = (torch.randn(20000) * 1e-2).to(dtype)
    x[:500] = 0
    R = float(x.float().abs().max())
    check(x, R)
    check(x, R * 0.5)


def test_non_contiguous_input():
    x = torch.randn(300, 70).t()
    assert not x.is_contiguous()
    check(x, 2.0)


def test_concurrent_callers_get_their_own_counts():
    torch.set_num_threads(2)
    xs = [torch.randn(20000, generator=torch.Generator().manual_seed(i)) * (i + 1) for i in range(6)]
    want = [reference(x, 2.0 * (i + 1)) for i, x in enumerate(xs)]
    got, errors = [None] * len(xs), []

    def run(i):
        try:
            for _ in range(5):
                got[i] = _histc(xs[i], 2.0 * (i + 1), BINS)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for (c, m, k), (rc, rm, rk) in zip(got, want):
        np.testing.assert_array_equal(c.numpy(), rc)
        assert (m, k) == (rm, rk)

