"""``grad_hist_2d``: joint histogram of individual gradient elements B*g_ij and parameter values theta_j.

Built one parameter tensor at a time from ``ctx.per_sample.per_sample_grads(k)`` (a [B, *shape]
tensor, freed before the next one): uniform bins, so the bin index is one multiply-and-floor per
element, and the joint index ix * ny + iy goes through one ``torch.bincount``.

Ranges (so that no element falls outside and nothing needs a second pass):
x: +-max |g_ij| where the layer rule gives it cheaply (factored), else the upper bound
max_j sqrt(sum_i g_ij^2) from the factored second moment; y: [min theta, max theta] (widened by a tiny margin when all values are equal).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from ..distributed import sum_tensors
from . import _noise as noise
from .base import Quantity


def _index(values: torch.Tensor, lo: float, hi: float, bins: int) -> torch.Tensor:
    idx = ((values - lo) * (bins / (hi - lo))).to(torch.int32)  # int32: faster than int64 here
    return idx.clamp_(0, bins - 1)


def _range(lo: float, hi: float) -> Tuple[float, float]:
    if not hi > lo:
        pad = max(abs(lo), 1.0) * 1e-6
        return lo - pad, hi + pad
    return lo, hi


def bin_edges(lo: float, hi: float, bins: int) -> list:
    """``bins + 1`` uniform edges from ``lo`` to ``hi``; a symmetric range (lo = -hi, bins even) has exactly 0 as
    its middle edge and mirrored edges (``linspace`` leaves it at +-5e-17, so that an exact zero, e.g. an
    embedding row no sample uses, was counted right of an edge logged right of 0)."""
    if lo == -hi and bins % 2 == 0:
        half = bins // 2
        return (torch.arange(-half, half + 1, dtype=torch.float64) / half * hi).tolist()
    return torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist()


def joint_histogram(grads: Sequence, params: Sequence[torch.Tensor], x_range, y_range, bins: Tuple[int, int]):
    """Counts [nx, ny] of (grads[k][i].flat[j], params[k].flat[j]) over k, i, j.

    ``grads`` yields [n, *shape] tensors (one per parameter, e.g. a generator that builds them lazily).
    """
    nx, ny = bins
    x_lo, x_hi = x_range
    y_lo, y_hi = y_range
    counts = None
    for g, p in zip(grads, params):
        iy = _index(p.detach().reshape(-1), y_lo, y_hi, ny)  # [P_k]
        ix = _index(g.reshape(g.shape[0], -1), x_lo, x_hi, nx)  # [n, P_k]
        del g
        joint = ix.mul_(ny).add_(iy)
        c = torch.bincount(joint.reshape(-1), minlength=nx * ny)
        counts = c if counts is None else counts + c
        del ix, joint
    return counts.reshape(nx, ny)


class GradHist2d(Quantity):
    name = "grad_hist_2d"
    needs = frozenset({"layer_io"})
    reads_theta = "all"  # the parameter values at theta_t (engine/param_versions.py)
    per_sample_stats = frozenset({"m2"})  # joins the step's shared per-layer pass (persample/plan.py)
    default_schedule = "log"
    description = "joint histogram of individual gradient elements and parameter values"

    def __init__(self, schedule=None, *, bins: Tuple[int, int] = (40, 50)):
        super().__init__(schedule)
        self.bins = (int(bins[0]), int(bins[1]))

    def before_step(self, ctx):
        try:
            ps = ctx.per_sample
            missing = dict(ps.unsupported())
            keep = [k for k, n in enumerate(ctx.names) if n not in missing and k not in ps.frozen]  # frozen: untrained
            if not keep:
                ctx.emit_nan(self.name, f"per-sample gradients unavailable: {missing}")
                return
            moments = noise.second_moment(ctx)  # over the global batch in a data-parallel run
            cheap = ps.cheap_max_abs_per_param()
        except Exception as err:
            ctx.emit_nan(self.name, f"per-sample gradients unavailable ({type(err).__name__}: {err})")
            return
        with torch.no_grad():
            params = [ctx.params[k].detach() for k in keep]
            # max |g_ij| where the layer gives it cheaply, else the bound sqrt(max_j sum_i g_ij^2)
            bounds = [cheap[k].double() if cheap[k] is not None else moments[k].max().double().sqrt() for k in keep]
            x_max = torch.stack(bounds).max().reshape(1)
            if ctx.watched.dist is not None:  # one grid for all processes (their counts are added)
                x_max = ctx.watched.dist.max_(x_max)
            x_max = float(x_max[0])
            y_lo = float(torch.stack([p.min().double() for p in params]).min())
            y_hi = float(torch.stack([p.max().double() for p in params]).max())
            x_range = _range(-x_max, x_max)
            y_range = _range(y_lo, y_hi)
            if not all(map(math.isfinite, x_range + y_range)):
                ctx.emit_nan(self.name, "non-finite gradients or parameters")
                return
            grads = (ps.per_sample_grads(k) for k in keep)
            counts = joint_histogram(grads, params, x_range, y_range, self.bins)
            (counts,) = sum_tensors(ctx.watched.dist, [counts])
        nx, ny = self.bins
        data = {
            "x_edges": bin_edges(x_range[0], x_range[1], nx),
            "y_edges": bin_edges(y_range[0], y_range[1], ny),
            "counts": counts.tolist(), "x": "B*g_ij", "y": "theta_j"}
        if missing:
            data["missing"] = missing
        ctx.emit_data(self.name, data)


