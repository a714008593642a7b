"""Gradient flow per layer: ||g|| of each parameter tensor, in model order (input to output).

A vanishing or exploding gradient shows as a slope across depth. Two lines over the parameters: the
norm at the last step of the range, and the median over the range with its min-max band. Reads
``grad_norm/<param>`` (the per-parameter parts of ``grad_norm``, logged when the model has more than
one parameter tensor); the order is that of the run header's ``params``.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from . import Instrument, missing_reason
from ._draw import PALETTE, finish, scale_y, short_name


def per_layer(run) -> Tuple[List[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(parameter names, last finite value, median, min, max) of ``grad_norm/<param>`` over the run."""
    keys = run.subkeys("grad_norm")
    order = [p.get("name") for p in run.header.get("params", []) if isinstance(p, dict)]
    rank = {f"grad_norm/{n}": i for i, n in enumerate(order)}
    keys = sorted(keys, key=lambda k: rank.get(k, len(rank)))
    names, last, med, lo, hi = [], [], [], [], []
    for key in keys:
        _, values = run.series(key)
        finite = values[np.isfinite(values)]
        if not finite.size:
            continue
        names.append(key.split("/", 1)[1])
        last.append(finite[-1])
        med.append(np.median(finite))
        lo.append(finite.min())
        hi.append(finite.max())
    return names, np.array(last), np.array(med), np.array(lo), np.array(hi)


class GradFlow(Instrument):
    name = "grad_flow"
    tab = "grad-norm"
    title = "Gradient flow per layer"
    group = "gradients"
    keys = ("grad_norm",)
    kind = "lines"
    description = ("||g|| of each parameter tensor in model order: last step, and median with min-max band over "
                   "the range. A slope across depth shows vanishing or exploding gradients.")

    def missing(self, run) -> Optional[str]:
        if len(per_layer(run)[0]) >= 2:
            return None
        if run.has_finite("grad_norm"):
            return "grad_norm has no per-parameter values (a model with a single parameter tensor)"
        return missing_reason(run, ["grad_norm"])

    def draw(self, ax, run) -> None:
        names, last, med, lo, hi = per_layer(run)
        x = np.arange(len(names))
        ax.fill_between(x, lo, hi, color=PALETTE[0], alpha=0.15, lw=0, label="min-max over the range")
        ax.plot(x, med, color=PALETTE[0], marker="o", ms=3, label="median over the range")
        ax.plot(x, last, color=PALETTE[1], marker="o", ms=3, label="last step")
        scale_y(ax, np.concatenate([lo, hi]) if len(names) else [])
        ax.set_xticks(x)
        ax.set_xticklabels([short_name(n, 16) for n in names], rotation=60, ha="right", fontsize="x-small")
        ax.set_title(self.title)
        finish(ax, "||g_param||₂", xlabel="", legend=True)
