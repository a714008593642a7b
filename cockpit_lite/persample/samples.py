"""Per-sample gradient information of one parameter from one layer call, in factored or dense form.

A layer rule returns, for each parameter of the module, a ``ParamSamples``: an object that answers
the per-sample statistics (over the call's b samples) with the cheapest route its layer allows.
The default answers go through ``materialize()`` ([b, *shape], built and dropped at once).
"""

from __future__ import annotations

from typing import Optional

import torch

from .bincount import count_in_range, fast_range_ok


class ParamSamples:
    """Per-sample gradients g_i (i < b) of one parameter, as far as one layer call contributes."""

    shape: torch.Size
    cheap_max: bool = False  # max_abs() without materializing

    def materialize(self) -> torch.Tensor:  # [b, *shape]
        raise NotImplementedError

    def sq_norms(self) -> torch.Tensor:  # [b]: ||g_i||^2
        G = self.materialize()
        return G.reshape(G.shape[0], -1).pow(2).sum(1)

    def dots(self, v: torch.Tensor) -> torch.Tensor:  # [b]: g_i . v
        G = self.materialize()
        return G.reshape(G.shape[0], -1) @ v.reshape(-1).to(G.dtype)

    def second_moment(self) -> torch.Tensor:  # [*shape]: sum_i g_i^2
        return self.materialize().pow(2).sum(0)

    def total(self) -> torch.Tensor:  # [*shape]: sum_i g_i
        return self.materialize().sum(0)

    def max_abs(self) -> torch.Tensor:  # 0-d: max_ij |g_ij|
        return self.materialize().abs().max()

    def materializes(self, stat: str) -> bool:
        """Whether ``stat`` ("sq", "m2", "dots") builds the per-sample gradients on this layer."""
        return True

    def factored_stats(self, stats, v=None):
        """The requested stats among "sq", "m2", "dots" where none of them materializes (shared
        intermediates where the layer allows)."""
        res = {}
        if "sq" in stats:
            res["sq"] = self.sq_norms()
        if "m2" in stats:
            res["m2"] = self.second_moment()
        if "dots" in stats:
            res["dots"] = self.dots(v)
        return res

    def fused_stats(self, stats, v=None, hist_range=None, bins: int = 100, extra=None, keep=None):
        """The requested stats among "sq" ([b]), "m2" ([*shape]), "dots" ([b], g_i . v) and "hist"
        ((counts, max_abs, clipped) over [-hist_range, hist_range], see ``histogram``) in one pass over
        the per-sample gradients, a block of samples at a time; ``extra`` ({key: vector}) adds g_i . vector
        under each key; ``keep`` (a list): the blocks [b', P] are appended to it, for ``kept_dots`` later
        in the step (a projection after the optimizer step without building them again)."""
        extra = extra or {}
        names = (["dots"] if "dots" in stats else []) + list(extra)  # every projection: one product per block
        U = torch.stack([(v if key == "dots" else extra[key]).reshape(-1) for key in names]) if names else None
        out = {"sq": [], "proj": [], "m2": None}
        counts, top, clipped = torch.zeros(bins, dtype=torch.float64), 0.0, 0
        for G, owned in self.pass_chunks(reuse=keep is None):  # kept blocks are built apart
            Gf = G.reshape(G.shape[0], -1)
            if keep is not None:
                keep.append(Gf)
            if U is not None:  # [k, b']: one read of the block for all k vectors (see ConvWeightSamples)
                out["proj"].append(U.to(Gf.dtype) @ Gf.T)
            if "hist" in stats:
                c, m, k = _histc(Gf, hist_range, bins)
                counts += c
                top, clipped = max(top, m), clipped + k
            if "m2" in stats:
                G2 = Gf.mul_(Gf) if owned and keep is None else Gf * Gf  # the last use of an owned block
                if "sq" in stats:
                    out["sq"].append(G2.sum(1))
                m = G2.sum(0)
                out["m2"] = m if out["m2"] is None else out["m2"].add_(m)  # m: a fresh sum
            elif "sq" in stats:
                out["sq"].append(row_sq_norms(Gf))
        res = dict(zip(names, torch.cat(out["proj"], 1))) if names else {}
        if "sq" in stats:
            res["sq"] = torch.cat(out["sq"])
        if "m2" in stats:
            res["m2"] = out["m2"].reshape(self.shape)
        if "hist" in stats:
            res["hist"] = (counts, top, clipped)
        return res

    def chunks(self):
        """The per-sample gradients [b', *shape], a block of samples at a time (default: all)."""
        yield self.materialize()

    def pass_chunks(self, reuse: bool = False):
        """(block [b', *shape], owned) for one pass over the per-sample gradients: ``owned`` when the block is
        built for this pass (which may then overwrite it); with ``reuse`` an owned block may live in scratch
        memory (``scratch.py``), valid until the next block is built. Default: ``chunks()``, not owned."""
        for G in self.chunks():
            yield G, False

    def kept_dots(self, blocks, v: torch.Tensor) -> torch.Tensor:
        """[b] g_i . v from the blocks ``fused_stats`` kept: one matrix-vector product per block."""
        u = v.reshape(-1)
        return torch.cat([Gf @ u.to(Gf.dtype) for Gf in blocks])

    def histogram(self, R: float, bins: int):
        """(counts, max_abs, clipped): counts of the elements g_ik in ``bins`` equal bins over [-R, R]
        (float64 [bins]; values outside go to the edge bins), the largest |g_ik| and how many were outside."""
        counts, top, clipped = torch.zeros(bins, dtype=torch.float64), 0.0, 0
        for G in self.chunks():
            c, m, k = _histc(G, R, bins)
            counts += c
            top, clipped = max(top, m), clipped + k
        return counts, top, clipped


class DenseSamples(ParamSamples):
    """Per-sample gradients that are cheap to hold ([b, *shape]), e.g. a bias or a norm's scale."""

    cheap_max = True

    def __init__(self, G_b_shape: torch.Tensor, terms: Optional[torch.Tensor] = None, dims=None,
                 factor: Optional[torch.Tensor] = None):
        self.G = G_b_shape
        self.shape = G_b_shape.shape[1:]
        # G = factor * terms.sum(dims) (a bias summed over positions): what floor_sq judges the rounding with
        self._terms, self._dims, self._factor = terms, dims, factor

    def floor_sq(self) -> Optional[torch.Tensor]:
        """sum_i || sum_t |terms_it| ||^2 (float64, 0-d) where G sums terms over positions, else None: float32
        rounds each g_i to about eps times sqrt of this, whatever g_i itself is (an attention key bias's sums
        cancel to 0, as softmax is invariant to it: its g_i are rounding noise)."""
        if self._terms is None:
            return None
        A = self._terms.abs().sum(self._dims)
        if self._factor is not None:
            A = A * self._factor.abs().to(A.dtype)
        return (A * A).sum().double()

    def materialize(self) -> torch.Tensor:
        return self.G

    def materializes(self, stat: str) -> bool:
        return False

    def factored_stats(self, stats, v=None):
        G = self.G.reshape(self.G.shape[0], -1)
        res = {}
        if "sq" in stats or "m2" in stats:
            G2 = G * G
            if "sq" in stats:
                res["sq"] = G2.sum(1)
            if "m2" in stats:
                res["m2"] = G2.sum(0).reshape(self.shape)
        if "dots" in stats:
            res["dots"] = G @ v.reshape(-1).to(G.dtype)
        return res


_ROW_BLOCK = 4096


def row_sq_norms(G: torch.Tensor) -> torch.Tensor:
    """[rows] sum of squares of each row of the 2-D G, in one read without a squared copy: the norm of
    blocks of ``_ROW_BLOCK`` columns, squared and summed (as accurate as (G * G).sum(1), ~1e-7 relative
    in float32, where one norm over a whole long row drifts to ~1e-4; 3-6x faster on the CPU)."""
    b, P = G.shape
    k = P // _ROW_BLOCK
    out = G.new_zeros(b)
    if k:
        out = torch.linalg.vector_norm(G[:, :k * _ROW_BLOCK].reshape(b, k, _ROW_BLOCK), dim=2).square().sum(1)
    if k * _ROW_BLOCK < P:
        out = out + torch.linalg.vector_norm(G[:, k * _ROW_BLOCK:], dim=1).square()
    return out


def max_abs_of(blocks) -> torch.Tensor:
    """0-d max |x| over the tensors ``blocks`` yields, from each one's extremes (no |x| copy of a block; a NaN
    propagates). Blocks may live in scratch memory: each is read before the next is built."""
    top = None
    for G in blocks:
        lo, hi = torch.aminmax(G)
        m = torch.maximum(-lo, hi)
        top = m if top is None else torch.maximum(top, m)
    return top


def to_float(t: torch.Tensor) -> torch.Tensor:
    """Statistics are computed in float32 at least (half-precision captures are upcast)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _bin_counts(G: torch.Tensor, R: float, bins: int) -> torch.Tensor:
    """Counts of the (finite, within [-R, R]) values of G in ``bins`` equal bins over [-R, R], with
    torch.histc's float32 bin arithmetic ((x - lo) * bins / (hi - lo), truncated, the top edge in the
    last bin), as one pass of elementwise ops and a bincount (several times faster than histc on CPU).
    Kept for ranges outside ``bincount.fast_range_ok``; ``bincount.count_in_range`` does the rest."""
    flat = G.reshape(-1)
    counts = torch.zeros(bins, dtype=torch.int64, device=G.device)
    step = 1 << 20  # bounded scratch memory (8 MB), whatever the block size
    for s in range(0, flat.numel(), step):
        t = torch.sub(flat[s:s + step], -R).mul_(bins).div_(2 * R)
        counts += torch.bincount(t.to(torch.int32).clamp_(0, bins - 1), minlength=bins)[:bins]
    return counts.double().cpu()


def _histc(G: torch.Tensor, R: float, bins: int):
    """(counts, max |G|, number outside [-R, R]) with outside values counted in the edge bins."""
    G = G.float()
    if G.device.type == "cpu" and G.numel() and fast_range_ok(R, bins):
        # one read of G: min/max, clipping, values below 0 and counts per chunk (bincount.py)
        res = count_in_range(G, R, bins, negatives=bins % 2 == 0)
        if res is not None:  # None: a NaN or an infinity, counted below
            c, lo, hi, neg, k = res  # neg None: the sign-exact arithmetic split the counts at 0 itself
            return (c.double() if neg is None else _sign_split(c.double(), neg)), max(-lo, hi), k
    return _histc_clamped(G, R, bins)


def _sign_split(counts: torch.Tensor, negatives) -> torch.Tensor:
    """The counts with every value below 0 left of the middle edge (0, for even ``bins``) and every other one
    right of it. The float32 bin arithmetic ((x + R) * bins / 2R) rounds x + R to R for |x| below R * 2^-24:
    a tiny negative gradient lands in the bin [0, 2R/bins) (17% of the two middle bins' counts of a saturated
    softmax's gradients), and for some R an exact zero lands one bin lower. The arithmetic is monotone, so only
    the two middle bins can hold values of the wrong sign: the difference between ``negatives`` and the counts
    left of the middle moves between them."""
    mid = counts.numel() // 2
    if counts.numel() % 2:
        return counts
    d = float(negatives) - float(counts[:mid].sum())
    counts[mid] -= d
    counts[mid - 1] += d
    return counts


def _histc_clamped(G: torch.Tensor, R: float, bins: int):
    """``_histc`` in several passes (max |G|, then the values outside [-R, R] clamped into a copy, then
    the counts): for the GPU, for NaN/infinities and for R outside ``bincount.fast_range_ok``."""
    G = G.float()
    m = 0.0
    if G.numel():  # max |G| from one pass that allocates nothing (NaN propagates as with abs().max())
        lo, hi = torch.aminmax(G)
        m = max(-float(lo), float(hi)) if not (lo != lo or hi != hi) else float("nan")
    k = 0
    if m > R:
        k = int(torch.count_nonzero(G.abs() > R))  # (a bool .sum() converts to int64 first)
        G = G.clamp(-R, R)
    if m == m and m != float("inf") and G.device.type == "cpu":
        count = _bin_counts
    else:
        def count(X, R, bins):
            return torch.histc(X, bins=bins, min=-R, max=R).double().cpu()
    counts = count(G, R, bins)
    if bins % 2 == 0:  # (clamping kept the signs; a NaN is in no bin and not below 0)
        counts = _sign_split(counts, int(torch.count_nonzero(G < 0)))
    return counts, m, k
