"""The advisor's thresholds, each with the reasoning behind its default (docs/advisor.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Mapping, Optional

#: thresholds that are counts of steps (whole numbers >= 1)
INTEGER = ("window", "min_points")
#: thresholds on alpha, which is negative or positive by nature; every other threshold is a positive number
SIGNED = ("alpha_high", "alpha_low")
#: shares of steps: in (0, 1]
SHARES = ("loss_spike_share", "early_stopping_share")


@dataclass(frozen=True)
class Thresholds:
    #: recent tracked steps a rule looks at (a diagnosis is about what training does now)
    window: int = 20
    #: fewest finite values a rule needs before it says anything
    min_points: int = 5
    #: median alpha above this: steps overshoot the minimum along the update (Cockpit paper, sec. 4:
    #: alpha > 0 lands past the minimum of the fitted parabola; 0.5 leaves room for noise)
    alpha_high: float = 0.5
    #: median alpha below this: steps barely move along the parabola (alpha = -1 is "no progress")
    alpha_low: float = -0.8
    #: a loss above this multiple of the window's running median is a spike
    loss_spike_factor: float = 3.0
    #: a loss anywhere in the run above this multiple of the median of its first losses: the loss blew up
    #: (one such step is evidence on its own: a 10x jump is far outside the noise of a mini-batch loss)
    loss_blowup_factor: float = 10.0
    #: share of recent steps that are spikes before it counts as evidence
    loss_spike_share: float = 0.15
    #: median ||d|| / ||theta|| below this: updates too small to change the network
    rel_update_small: float = 1e-4
    #: norm test above this (Byrd et al. 2012 use theta = 1... the test compares the gradient's
    #: variance with its norm): noise dominates the mini-batch gradient
    norm_test_high: float = 1.0
    #: all three gradient tests below this: the batch is larger than the tests require
    tests_low: float = 0.05
    #: ||g_layer|| / ||theta_layer|| above this: the layer's gradients explode
    grad_param_ratio_high: float = 10.0
    #: ||g_layer|| / ||g|| below this (but not zero): the layer's gradients vanish
    grad_share_low: float = 1e-6
    #: share of recent steps with early_stopping > 0 (Mahsereci et al. 2017) to report overfitting risk
    early_stopping_share: float = 0.8
    #: relative loss decrease per window below this counts as a stall (cost rule)
    stall_rel: float = 0.01
    #: cost per unit of loss decrease this many times the earlier window's: cost is rising
    cost_rise_factor: float = 2.0

    def with_overrides(self, overrides: Optional[Mapping[str, Any]]) -> "Thresholds":
        if not overrides:
            return self
        return replace(self, **validate(overrides))


def parse(items) -> Dict[str, Any]:
    """``["alpha_high=0.8", "window=30"]`` (the command line's ``--threshold``) -> validated overrides."""
    overrides: Dict[str, Any] = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep:
            raise ValueError(f"--threshold takes NAME=VALUE, got {item!r}")
        overrides[name.strip()] = value.strip()
    return validate(overrides)


def validate(overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Advisor threshold overrides, checked: known names, numbers (text such as ``"0.8"`` is read),
    whole numbers >= 1 for step counts, shares in (0, 1], every other threshold but alpha's > 0.
    The one check for ``diagnose``, ``watch(..., advisor={...})`` and ``cockpit-lite diagnose``;
    raises ``ValueError`` naming the threshold."""
    if not overrides:
        return {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"advisor thresholds must be a mapping name -> value, got {type(overrides).__name__}")
    known = {f.name for f in fields(Thresholds)}
    unknown = set(map(str, overrides)) - known
    if unknown:
        raise ValueError(f"unknown advisor thresholds {sorted(unknown)}; known: {sorted(known)}")
    out: Dict[str, Any] = {}
    for name, raw in overrides.items():
        if isinstance(raw, bool):
            raise ValueError(f"advisor threshold {name}: a number is needed, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"advisor threshold {name}: a number is needed, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"advisor threshold {name}: must be finite, got {raw!r}")
        if name in INTEGER:
            if value != int(value) or value < 1:
                raise ValueError(f"advisor threshold {name}: a whole number of steps >= 1 is needed, got {raw!r}")
            out[name] = int(value)
            continue
        if name in SHARES and not 0 < value <= 1:
            raise ValueError(f"advisor threshold {name}: a share of steps in (0, 1] is needed, got {raw!r}")
        if name not in SIGNED and value <= 0:
            raise ValueError(f"advisor threshold {name}: must be > 0, got {raw!r}")
        out[name] = value
    return out
