"""What the benchmark runner measures: the variants of a watched training step, and the issues' targets.

A variant is ``(quantities spec, start step, what it is)``. Three kinds, each timed against the plain
loop of the same problem and optimizer:

* every quantity alone, tracked every step (name = the quantity's name);
* the presets tracked every step (``default`` is every step by its own schedules), and the issues'
  sets ``noise``, ``noise+hist``, ``full-like``;
* the presets with their default schedules (``<preset> (default schedules)``), from step
  ``STEADY_STATE`` on, where the log-spaced curvature schedules have thinned out; timed in blocks of
  whole per-sample periods so tracked and untracked steps mix as in a run.
"""

from __future__ import annotations

from typing import Dict, Tuple

from cockpit_lite import presets
from cockpit_lite.quantities import REGISTRY

NOISE = ("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr")
CURVATURE = ("hess_max_ev", "hess_trace", "ggn_trace", "tic_diag", "tic_trace", "grad_hist_2d")
PRESETS = ("default", "economy", "business", "full")
STEADY_STATE = 1000  # "default schedules" variants start here (log schedules thin out); a per-sample step
# the issues' targets: (problem, variant) -> largest acceptable median ratio to the plain step. Issue 21's
# (the overhead issue) replace the earlier issues' where both name a row; ``TARGET_ISSUE`` says whose
TARGETS = {
    ("mlp", "default"): 1.2, ("cnn", "default"): 1.05,
    ("mlp", "alpha"): 1.4, ("cnn", "alpha"): 1.2,
    ("mlp", "noise"): 2.3, ("cnn", "noise"): 1.4,
    ("mlp", "noise+hist"): 4.0, ("cnn", "noise+hist"): 1.6,
    ("cnn", "hess_max_ev"): 5.0, ("cnn", "full-like"): 8.0,
    ("cnn", "full (default schedules)"): 1.15,
    ("cnn", "economy (every step)"): 2.2, ("cnn", "economy (default schedules)"): 1.08,
    ("transformer4", "economy (default schedules)"): 1.12, ("resnet18_gn", "economy (default schedules)"): 1.12,
}
TARGET_ISSUE = {key: "21" for key in [("mlp", "default"), ("mlp", "noise"), ("cnn", "economy (every step)"),
                                      ("cnn", "economy (default schedules)"), ("transformer4", "economy (default schedules)"),
                                      ("resnet18_gn", "economy (default schedules)")]}
Variant = Tuple[Dict[str, str], int, str]


def every(names) -> Dict[str, str]:
    return {n: "every" for n in names}


def quantities_alone() -> Dict[str, Variant]:
    return {name: ({name: "every"}, 0, f"{name} alone, every step") for name in sorted(REGISTRY)}


def preset_sets(optimizer: str = "sgd", curvature: bool = True) -> Dict[str, Variant]:
    """The presets tracked every step, and (for SGD) the issues' sets; without the ones that compute
    curvature on every step unless ``curvature``."""
    v = {"default": (presets.preset("default"), 0, "the default preset (first-order quantities, every step; issue 2)")}
    for name in PRESETS[1:]:
        if curvature or not set(presets.preset(name)) & set(CURVATURE):
            v[f"{name} (every step)"] = (presets.preset(name, "every"), 0, f"the {name} preset, every quantity every step")
    if optimizer == "sgd":
        full_like = every(presets.preset("economy"))
        full_like.update(every(CURVATURE))
        v.update({
            "noise": (every(NOISE), 0, "grad_norm + norm/inner/ortho tests + GSNR, every step (issue 3)"),
            "noise+hist": (every(NOISE + ("grad_hist_1d",)), 0, "the same + 1D histogram (issue 3)"),
        })
        if curvature:
            v["full-like"] = (full_like, 0, "economy + all curvature + 2D histogram, every step (issue 5)")
    return v


def scheduled() -> Dict[str, Variant]:
    """Presets as shipped (``default`` is omitted: its schedules are every step, the row ``default``)."""
    return {f"{name} (default schedules)": (presets.preset(name), STEADY_STATE,
                                            f"the {name} preset as shipped, from step {STEADY_STATE} on")
            for name in PRESETS[1:]}


def every_step(problem: str, optimizer: str, alone: bool, curvature: bool = True, sets: bool = True) -> Dict[str, Variant]:
    """The every-step variants: presets and sets, and every quantity alone when ``alone``; the
    curvature quantities (expensive on every step) only when ``curvature``; the issues' sets
    (noise, noise+hist, alpha) only when ``sets``. The variants with a target on ``problem`` are
    always in."""
    candidates = dict(preset_sets(optimizer), **quantities_alone())
    v = preset_sets(optimizer, curvature)
    if not sets:
        v = {name: variant for name, variant in v.items() if name == "default" or name.endswith("(every step)")}
    if alone:
        for name, variant in quantities_alone().items():
            if curvature or name not in CURVATURE:
                v.setdefault(name, variant)
    if sets:
        v.setdefault("alpha", candidates["alpha"])  # the issue-4 target row, with every optimizer
    for (p, name) in TARGETS:
        if p == problem and name in candidates and optimizer == "sgd":  # with Adam: default and alpha
            v.setdefault(name, candidates[name])
    return v
