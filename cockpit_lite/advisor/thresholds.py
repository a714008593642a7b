"""The advisor's thresholds, each with the reasoning behind its default (docs/advisor.md)."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict


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

    def with_overrides(self, overrides: Dict[str, Any] | None) -> "Thresholds":
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown advisor thresholds {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **overrides)
