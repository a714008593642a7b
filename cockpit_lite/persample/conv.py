"""nn.Conv1d / Conv2d / Conv3d (any stride, padding, dilation, groups).

The per-sample weight gradients of a block of b' samples come from one call of the convolution's
weight-gradient kernel, with the samples stacked along the channels and groups = b' * groups:
each sample (and group) becomes its own group, so the kernel returns [b' * out, in/groups, *k], i.e.
[b', *weight.shape]. This costs about what the weight gradient of the backward pass costs, and
avoids im2col (F.unfold), which is slow on CPU and k times larger than the input.

For 2D convolutions with groups = 1 there is a second way to build them: one batched GEMM per
kernel offset (delta [b, out, HW'] times the input window shifted by that offset), giving the blocks
kernel offset first, [kh * kw, b', out, in]. Which one is faster depends on the layer (the grouped
kernel is slow on small maps with many channels, e.g. 3x faster with the GEMMs on 8x8 maps with 64
channels); on CPU both are timed once per layer configuration and the faster one is kept. Both give
the same numbers up to float rounding.

Convolutions have no factored form for sum_i g_i^2, so every statistic is taken from these blocks
(``fused_stats`` computes ||g_i||^2, sum_i g_i^2, g_i . v and the histogram in the same pass, squaring
each fresh block in place); memory stays at one block of B x (this layer) floats or less.

g_i . v alone (``alpha``) has a route without the blocks: one forward convolution of the inputs with
v, times delta, summed per sample; on CPU it is timed against the blocks once per configuration (it
is taken on other devices).

String padding ('same'/'valid') and non-zero padding modes go through the generic fallback.
"""

from __future__ import annotations

import time
from typing import Dict

import torch
import torch.nn.functional as F

from . import scratch
from .samples import DenseSamples, ParamSamples, _histc, max_abs_of, row_sq_norms, to_float

_CHUNK_FLOATS = 1 << 24


def conv_supported(module) -> bool:
    return (isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))
            and not isinstance(module.padding, str) and module.padding_mode == "zeros")


def per_sample_conv_weight_grads(module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """[b, *weight.shape] per-sample weight gradients of ``module`` for input x and output grad delta."""
    b, C = x.shape[:2]
    O = delta.shape[1]
    w_shape = module.weight.shape
    G = module.groups
    dummy = x.new_empty((b * O, *w_shape[1:]))  # only its shape is used (no input gradient asked)
    nd = x.dim() - 2
    gw = torch.ops.aten.convolution_backward(
        delta.reshape(1, b * O, *delta.shape[2:]), x.reshape(1, b * C, *x.shape[2:]), dummy, None,
        list(module.stride), list(module.padding), list(module.dilation), False, [0] * nd, b * G,
        [False, True, False])[1]
    return gw.reshape(b, *w_shape)


def _shifts_supported(module, x: torch.Tensor) -> bool:
    return x.dim() == 4 and module.groups == 1


def per_sample_conv_weight_grads_k(module, x: torch.Tensor, delta: torch.Tensor, reuse: bool = False) -> torch.Tensor:
    """[kh * kw, b, out, in] per-sample weight gradients of a 2D convolution (groups = 1), kernel offset
    first: one batched GEMM per kernel offset, delta [b, out, HW'] times the input window shifted by
    that offset [b, HW', in]. Cheaper than the grouped kernel where the output is small and the
    channels many (e.g. 8x8 maps with 64 channels). ``reuse``: written into the pass's scratch block
    (``scratch.py``; valid until the next block is built)."""
    b, C = x.shape[:2]
    O, Ho, Wo = delta.shape[1:]
    kh, kw = module.kernel_size
    sh, sw = module.stride
    ph, pw = module.padding
    dh, dw = module.dilation
    xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
    D = delta.reshape(b, O, Ho * Wo)
    shape = (kh * kw, b, O, C)
    out = scratch.take("conv_block", shape, x.dtype, x.device) if reuse else x.new_empty(shape)
    for i in range(kh):
        for j in range(kw):
            xs = xp[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]
            if reuse and not xs.is_contiguous():  # the window's copy, in reused memory too
                xs = scratch.take("conv_window", xs.shape, x.dtype, x.device).copy_(xs)
            torch.bmm(D, xs.reshape(b, C, Ho * Wo).transpose(1, 2), out=out[i * kw + j])
    return out


def _k_to_weight_layout(Gk: torch.Tensor, shape) -> torch.Tensor:
    """[K, b, out, in] -> [b, out, in, kh, kw]."""
    return Gk.permute(1, 2, 3, 0).reshape(Gk.shape[1], *shape)


_METHOD: Dict[tuple, str] = {}  # layer configuration -> "grouped" | "shifts" (measured once)
_DOTS_METHOD: Dict[tuple, str] = {}  # layer configuration -> "conv" | "blocks" (g_i . v, measured once)
_MAX_MEASURED = 256  # configurations measured at most (shapes that change every step: stop measuring)


def _config(module, x, delta):
    return (tuple(x.shape), tuple(delta.shape), tuple(module.weight.shape), tuple(module.stride),
            tuple(module.padding), tuple(module.dilation), module.groups, x.dtype, x.device.type)


def _fastest(candidates, repeats: int = 2) -> str:
    """Name of the candidate with the smallest measured time (min over ``repeats`` interleaved runs)."""
    best = {name: float("inf") for name in candidates}
    for name, fn in candidates.items():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get)


class ConvWeightSamples(ParamSamples):
    def __init__(self, module, x: torch.Tensor, delta: torch.Tensor):
        self.module, self.x, self.D = module, x, delta
        self.shape = module.weight.shape
        self._method = None

    def _block_rows(self) -> int:
        return max(1, _CHUNK_FLOATS // max(1, self.shape.numel()))

    def method(self) -> str:
        """How the per-sample blocks are built: the grouped weight-gradient kernel, or one batched GEMM
        per kernel offset (2D, groups = 1); on CPU the faster one for this layer configuration, measured
        once (both give the same numbers up to float rounding)."""
        if self._method is None:
            if not _shifts_supported(self.module, self.x) or self.x.device.type != "cpu":
                self._method = "grouped"
            else:
                key = _config(self.module, self.x, self.D)
                if key not in _METHOD and len(_METHOD) >= _MAX_MEASURED:
                    _METHOD[key] = "grouped"
                if key not in _METHOD:
                    s = min(self.x.shape[0], self._block_rows())
                    x, d = self.x[:s], self.D[:s]
                    _METHOD[key] = _fastest({
                        "grouped": lambda: per_sample_conv_weight_grads(self.module, x, d),
                        "shifts": lambda: per_sample_conv_weight_grads_k(self.module, x, d)})
                self._method = _METHOD[key]
        return self._method

    def _raw_chunks(self, reuse: bool = False):
        """Blocks of per-sample gradients in the method's own layout ([b', *shape] or [K, b', out, in]);
        ``reuse``: each block (shifts) in the same scratch memory, valid until the next is built."""
        b = self.x.shape[0]
        step = self._block_rows()
        shifts = self.method() == "shifts"
        for s in range(0, b, step):
            if shifts:
                yield per_sample_conv_weight_grads_k(self.module, self.x[s:s + step], self.D[s:s + step], reuse)
            else:  # (the grouped kernel has no out= variant that writes in place)
                yield per_sample_conv_weight_grads(self.module, self.x[s:s + step], self.D[s:s + step])

    def materialize(self) -> torch.Tensor:
        if self.method() == "shifts":
            return _k_to_weight_layout(per_sample_conv_weight_grads_k(self.module, self.x, self.D), self.shape)
        return per_sample_conv_weight_grads(self.module, self.x, self.D)

    def chunks(self):
        shifts = self.method() == "shifts"
        for G in self._raw_chunks():
            yield _k_to_weight_layout(G, self.shape) if shifts else G

    def _layout(self, us, shifts: bool):
        """Vectors shaped like the weight, stacked in the blocks' layout: [K, k, O*C] (shifts) or [k, P]
        (see ``_block_projs``)."""
        O, C = self.shape[:2]
        K = self.shape.numel() // (O * C)
        shape = (K, len(us), O * C) if shifts else (len(us), self.shape.numel())
        U = scratch.take("conv_dirs", shape, self.x.dtype, self.x.device)  # valid for this call (scratch.py)
        for j, u in enumerate(us):
            if shifts:
                U[:, j].copy_(u.reshape(O * C, K).T)
            else:
                U[j].copy_(u.reshape(-1))
        return U

    @staticmethod
    def _block_projs(Gf: torch.Tensor, U: torch.Tensor, shifts: bool) -> torch.Tensor:
        """[k, b] g_i . u for the k stacked vectors U and one block [K, b, O*C] (shifts) or [b, P]: one
        product with the block transposed, a single read of it whatever k (about one matrix-vector
        product's time for k <= 3 on the CPU, where k separate products read the block k times)."""
        if shifts:
            return torch.bmm(U, Gf.transpose(1, 2)).sum(0)
        return U @ Gf.T

    def fused_stats(self, stats, v=None, hist_range=None, bins: int = 100, extra=None, keep=None):
        """As ``ParamSamples.fused_stats``, on blocks in the method's own layout; each block is fresh,
        so where the second moment is asked it is squared in place once the projections (g_i . v,
        ``extra``) and the histogram are taken (||g_i||^2 alone: ``row_sq_norms``, no squared copy).
        ``keep`` (a list): the blocks are appended to it (then squared into a new tensor), for
        ``kept_dots`` later in the step."""
        O, C = self.shape[:2]
        shifts = self.method() == "shifts"
        K = self.shape.numel() // (O * C)
        names = (["dots"] if "dots" in stats else []) + list(extra or {})  # every projection: one product
        U = self._layout([v if key == "dots" else extra[key] for key in names], shifts) if names else None
        projs, sq, m2 = [], [], None
        counts, top, clipped = torch.zeros(bins, dtype=torch.float64), 0.0, 0
        for G in self._raw_chunks(reuse=keep is None):  # kept blocks are built apart
            if shifts:
                b = G.shape[1]
                Gf = G.reshape(K, b, O * C)
            else:
                b = G.shape[0]
                Gf = G.reshape(b, -1)
            if U is not None:
                projs.append(self._block_projs(Gf, U, shifts))
            if keep is not None:
                keep.append(Gf)
            if "hist" in stats:
                c, m, k = _histc(Gf, hist_range, bins)
                counts += c
                top, clipped = max(top, m), clipped + k
            if "m2" in stats:
                G2 = Gf.mul_(Gf) if keep is None else Gf * Gf
                if "sq" in stats:
                    sq.append(G2.sum(2).sum(0) if shifts else G2.sum(1))
                m = G2.sum(1) if shifts else G2.sum(0)
                m2 = m if m2 is None else m2.add_(m)
            elif "sq" in stats:  # one read, no squared copy
                sq.append(row_sq_norms(Gf.reshape(-1, Gf.shape[-1])).reshape(K, b).sum(0) if shifts
                          else row_sq_norms(Gf))
        res = dict(zip(names, torch.cat(projs, 1))) if names else {}
        if "sq" in stats:
            res["sq"] = torch.cat(sq)
        if "m2" in stats:
            res["m2"] = (m2.T if shifts else m2).reshape(self.shape)
        if "hist" in stats:
            res["hist"] = (counts, top, clipped)
        return res

    def histogram(self, R: float, bins: int):
        return self.fused_stats({"hist"}, None, R, bins)["hist"]

    def kept_dots(self, blocks, v: torch.Tensor) -> torch.Tensor:
        """[b] g_i . v from the blocks ``fused_stats`` kept (one small product per block, no convolution)."""
        shifts = self.method() == "shifts"
        U = self._layout([v], shifts)
        return torch.cat([self._block_projs(Gf, U, shifts)[0] for Gf in blocks])

    def sq_norms(self) -> torch.Tensor:
        return self.fused_stats({"sq"})["sq"]

    def second_moment(self) -> torch.Tensor:
        return self.fused_stats({"m2"})["m2"]

    def _conv_dots(self, v: torch.Tensor) -> torch.Tensor:
        """g_i . v = sum over output positions of delta_i * (x_i conv v): one forward convolution."""
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.x.dim() - 3]
        y = conv(self.x, v.to(self.x.dtype), None, self.module.stride, self.module.padding, self.module.dilation,
                 self.module.groups)
        return y.mul_(self.D).reshape(self.x.shape[0], -1).sum(1)  # y is this call's own: no second temporary

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        key = _config(self.module, self.x, self.D)
        if key not in _DOTS_METHOD:
            if self.x.device.type != "cpu" or len(_DOTS_METHOD) >= _MAX_MEASURED:
                _DOTS_METHOD[key] = "conv"
            else:
                _DOTS_METHOD[key] = _fastest({"conv": lambda: self._conv_dots(v),
                                              "blocks": lambda: self.fused_stats({"dots"}, v)})
        if _DOTS_METHOD[key] == "conv":
            return self._conv_dots(v)
        return self.fused_stats({"dots"}, v)["dots"]

    def total(self) -> torch.Tensor:  # the ordinary weight gradient: one call over the whole batch
        nd = self.x.dim() - 2
        return torch.ops.aten.convolution_backward(
            self.D, self.x, self.module.weight.detach().to(self.x.dtype), None, list(self.module.stride),
            list(self.module.padding), list(self.module.dilation), False, [0] * nd, self.module.groups,
            [False, True, False])[1]

    def max_abs(self) -> torch.Tensor:
        return max_abs_of(self._raw_chunks(reuse=True))


def conv_samples(module, x: torch.Tensor, grad: torch.Tensor, factor: torch.Tensor):
    """The weight's and bias's per-sample information for input x and output gradient ``grad``; the
    per-sample loss gradient is ``grad * factor`` (0-d). The weight's per-sample gradients are
    bilinear in (x, delta), so the factor scales the smaller of x and grad (an output gradient can be
    many times the input, e.g. 32 channels out of 3): one pass over fewer floats."""
    x, D = to_float(x), to_float(grad)
    b = x.shape[0]
    if x.numel() < D.numel():
        xs, Ds = x * factor.to(x.dtype), D.contiguous()
    else:
        xs, Ds = x.contiguous(), D * factor.to(D.dtype)
    out = {"weight": ConvWeightSamples(module, xs, Ds)}
    if module.bias is not None:
        Db = D.reshape(b, D.shape[1], -1)
        out["bias"] = DenseSamples(Db.sum(2) * factor.to(D.dtype), terms=Db, dims=2, factor=factor)
    return out
