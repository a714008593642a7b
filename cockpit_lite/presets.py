"""Named sets of quantities with their default schedules.

``default`` is the cheap set: the first-order quantities, every step. ``economy``, ``business`` and
``full`` hold the quantities of Cockpit's presets of the same names (economy: alpha, distance,
grad_hist_1d, grad_norm, inner_test, loss, norm_test, ortho_test, update_size; business: + tic_diag,
hess_trace; full: + hess_max_ev, grad_hist_2d), plus this package's cheap first-order set. Their
default schedules keep the whole set cheap: first-order quantities every step, per-sample quantities
every ``PER_SAMPLE_EVERY`` steps, curvature on log-spaced steps. ``preset(name, schedule="every")``
tracks every quantity of a preset on every step instead (Cockpit's behaviour, and its cost).
"""

from __future__ import annotations

from typing import Dict, Optional

FIRST_ORDER = ("loss", "grad_norm", "grad_norm_preclip", "param_norm", "distance", "update_size", "lr", "time")
PER_SAMPLE_EVERY = 10
PER_SAMPLE = "every:%d" % PER_SAMPLE_EVERY
CURVATURE = "log"

PRESETS: Dict[str, Dict[str, str]] = {"default": {name: "every" for name in FIRST_ORDER}}
PRESETS["economy"] = dict(PRESETS["default"], alpha=PER_SAMPLE, norm_test=PER_SAMPLE, inner_test=PER_SAMPLE,
                          ortho_test=PER_SAMPLE, grad_hist_1d=PER_SAMPLE)
PRESETS["business"] = dict(PRESETS["economy"], tic_diag=CURVATURE, hess_trace=CURVATURE)
PRESETS["full"] = dict(PRESETS["business"], hess_max_ev=CURVATURE, grad_hist_2d=CURVATURE)


def preset(name: str, schedule: Optional[str] = None) -> Dict[str, str]:
    """The quantities of preset ``name`` with their schedules; ``schedule`` overrides them all."""
    try:
        spec = dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
    if schedule is not None:
        spec = {q: schedule for q in spec}
    return spec
