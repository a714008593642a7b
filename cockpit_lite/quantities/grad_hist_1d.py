"""``grad_hist_1d``: histogram (100 bins) of all individual gradient elements g_ij = d l_i / d theta_j.

These are the values Cockpit histograms as "B * g_ij" (its individual gradients are BackPACK's
grad(l_i)/B for a mean loss), so the same batch gives the same counts. One layer's per-sample
gradients are built at a time and dropped after counting.

Range (symmetric, [-R, R]): R = max |g_ij| of the step where that maximum is cheap (Linear layers
without sequence axes: max|delta| * max|a| per sample; biases, norms, embeddings), and for the other
layers (convolutions, sequence Linear, fallback) the maximum they had on the previous tracked step
(computed exactly, by building them once, on the first tracked step). Values outside [-R, R] (only
possible for those layers) are counted in the edge bins and reported as ``clipped``.

Linear layers without sequence axes are counted without forming their [B, out, in] per-sample
gradients (binary search of each row's bin edges in the sorted inputs, ``outer_product_histogram``);
the other layers are built a block of samples at a time and counted with ``torch.histc``.
"""

from __future__ import annotations

import math

import torch

from .base import Quantity
from .grad_hist_2d import bin_edges

BINS = 100


class GradHist1d(Quantity):
    name = "grad_hist_1d"
    needs = frozenset({"layer_io"})
    description = "histogram of per-sample gradient elements (100 bins, adaptive symmetric range)"

    def __init__(self, schedule=None):
        super().__init__(schedule)
        self._last_max = {}  # parameter index -> max |g_ij| seen on the last tracked step
        self._local = None  # a data-parallel run's local histogram, until the others' counts are added

    per_sample_stats = frozenset({"hist"})  # lets PerSampleView count conv layers in its shared pass
    # DDP: the counts, clipped and whether counted, added over the processes in the hook's closing check
    step_sums = BINS + 3

    def hist_range(self, view) -> float:
        """R of this step (see the module docstring); computed once per step."""
        if "grad_hist_1d_R" in view._cache:
            return view._cache["grad_hist_1d_R"]
        reasons = view.unsupported()
        cheap = view.cheap_max_abs_per_param()
        tops = [0.0]
        for j, name in enumerate(view.names):
            if name in reasons:
                continue
            if cheap[j] is not None:
                tops.append(float(cheap[j]))
            else:
                if j not in self._last_max:  # first time: build them once for the exact maximum
                    self._last_max[j] = max((float(G.abs().max()) for G in view.chunks(j)), default=0.0)
                tops.append(self._last_max[j])
        # a NaN maximum (non-finite per-sample gradients) must not vanish in max(): NaN range, reported
        R = max(tops) if all(math.isfinite(t) for t in tops) else math.nan
        dist = view.inputs.watched.dist
        if dist is not None:  # one range for all processes (their counts are added)
            R = float(dist.max_(torch.tensor([R], dtype=torch.float64))[0])
        if R == R and not R > 0:
            R = 1e-12
        view._cache["grad_hist_1d_R"] = R
        return R

    def before_step(self, ctx):
        self._local = None  # this process's histogram, waiting for the others' (data-parallel runs)
        view = ctx.per_sample
        reasons = view.unsupported()
        usable = [j for j, n in enumerate(ctx.names) if n not in reasons and j not in view.frozen]  # frozen: untrained
        if not usable:
            ctx.emit_data(self.name, {"edges": None, "counts": None, "scale": "B*g_ij",
                                      "reason": "no parameter has per-sample information: " + "; ".join(
                                          f"{k}: {v}" for k, v in list(reasons.items())[:3])})
            return
        cheap = view.cheap_max_abs_per_param()
        R = self.hist_range(view)
        if not math.isfinite(R):
            for j in usable:  # a later step measures the range again
                self._last_max.pop(j, None)
            ctx.emit_data(self.name, {"edges": None, "counts": None, "scale": "B*g_ij",
                                      "reason": "the per-sample gradients are not finite on this step"})
            return
        counts = torch.zeros(BINS, dtype=torch.float64)
        clipped = 0
        for j in usable:
            c, top, k = view.histogram(j, R, BINS)
            counts += c
            if cheap[j] is None:
                self._last_max[j] = top
            clipped = -1 if (k < 0 or clipped < 0) else clipped + k
        edges = bin_edges(-R, R, BINS)
        data = {"edges": edges, "counts": [int(c) for c in counts.round().tolist()], "scale": "B*g_ij",
                "clipped": clipped}
        if reasons:
            data["excluded"] = dict(reasons)
        if ctx.watched.dist is not None:  # the global batch: the processes' counts are added (with_sums)
            self._local = (counts, clipped, data)
            return
        ctx.emit_data(self.name, data)

    def local_sums(self, ctx):
        if self._local is None:  # nothing counted (recorded why): the same decision in every process
            return [0.0] * self.step_sums
        counts, clipped, _ = self._local
        return [*counts.tolist(), max(clipped, 0), clipped < 0, 1.0]

    def with_sums(self, ctx, totals):
        local, self._local = self._local, None
        counted = int(totals[BINS + 2])
        if local is None and not counted:
            return
        if local is None or counted != ctx.watched.dist.size:
            raise RuntimeError(f"the histogram was counted in {counted} of {ctx.watched.dist.size} processes")
        data = local[2]
        data["counts"] = [int(c) for c in torch.tensor(totals[:BINS]).round().tolist()]
        data["clipped"] = -1 if totals[BINS + 1] else int(totals[BINS])
        ctx.emit_data(self.name, data)

    def close(self):
        self._last_max = {}
        self._local = None
