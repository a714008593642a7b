"""The advisor acts only on evidence that clears its own uncertainty, and says what it could not check
(issue 25: advice at the noise level; issue 24 item 9: confident advice on empty batches and zero gradients,
"No problem found" on a run whose quantities were all NaN)."""

import math

import numpy as np
import pytest

import cockpit_lite
from cockpit_lite.advisor import diagnose, report
from cockpit_lite.advisor.stats import median_interval
from cockpit_lite.runlog import RunLogWriter

PARAMS = [{"name": "0.weight", "shape": [4, 4], "numel": 16}]


def log(path, n=40, samples=lambda t: 32, reasons=None, flags=None, **series):
    w = RunLogWriter(path, {"optimizer": "SGD", "params": PARAMS})
    base = {"loss": lambda t: 2.0 * math.exp(-t / 30) + 0.1, "lr": lambda t: 0.1, "grad_norm": lambda t: 1.0,
            "grad_norm/0.weight": lambda t: 1.0, "param_norm": lambda t: 5.0, "param_norm/0.weight": lambda t: 5.0,
            "update_size": lambda t: 0.05, "time": lambda t: 0.01}
    base.update(series)
    for t in range(n):
        rec = {"type": "step", "step": t, "values": {k: f(t) for k, f in base.items()}, "samples": samples(t)}
        if reasons:
            rec["reasons"] = {k: r for k, r in reasons.items() if not math.isfinite(rec["values"].get(k, 0.0))}
        if flags and flags(t):
            rec["flags"] = flags(t)
        w.write(rec)
    w.close({"steps": n})
    return cockpit_lite.load(path)


def test_the_median_interval_covers_the_median_at_its_level():
    # reference: simulation with a known median (0), independent of the binomial construction
    rng = np.random.default_rng(0)
    for n in (5, 12, 20, 60):
        hits = 0
        for _ in range(2000):
            lo, hi = median_interval(rng.standard_normal(n))
            hits += lo <= 0.0 <= hi
        assert hits / 2000 >= 0.93, n
    # the order statistics of the published table (n=20: x(6)..x(15), 1-based)
    assert median_interval(np.arange(1, 21)) == (6.0, 15.0)
    assert median_interval(np.arange(1, 11)) == (2.0, 9.0)


def test_no_batch_advice_at_the_noise_level_of_the_test(tmp_path):
    rng = np.random.default_rng(1)
    noisy = 1.01 + 0.3 * rng.standard_normal(40)  # median about 1.0, spread 0.3
    run = log(tmp_path / "noisy", norm_test=lambda t: float(noisy[t]))
    assert "gradient_noise_dominates" not in [d.rule for d in diagnose(run)], report(run)
    clear = 3.0 + 0.1 * rng.standard_normal(40)
    run = log(tmp_path / "clear", norm_test=lambda t: float(clear[t]))
    (d,) = [d for d in diagnose(run) if d.rule == "gradient_noise_dominates"]
    lo, hi = d.evidence[0]["interval"]
    assert 1.0 < lo <= np.median(clear[-20:]) <= hi
    assert "within the test's 95% interval" in d.action


def test_alpha_advice_needs_its_interval_beyond_the_threshold(tmp_path):
    rng = np.random.default_rng(2)
    wide = 0.55 + 1.0 * rng.standard_normal(40)
    assert "lr_too_large" not in [d.rule for d in diagnose(log(tmp_path / "w", alpha=lambda t: float(wide[t])))]
    assert "lr_too_large" in [d.rule for d in diagnose(log(tmp_path / "n", alpha=lambda t: 0.9))]


def test_one_empty_batch_is_not_a_divergence(tmp_path):
    nan = float("nan")
    run = log(tmp_path, samples=lambda t: 0 if t == 17 else 32, loss=lambda t: nan if t == 17 else 1.0,
              flags=lambda t: ["nonfinite_loss"] if t == 17 else None)
    found = {d.rule: d for d in diagnose(run)}
    assert "divergence" not in found, report(run)
    assert "empty_batches" in found and found["empty_batches"].confidence < 1 and "step 17" in found["empty_batches"].title


def test_a_transient_non_finite_loss_is_not_called_a_divergence_at_full_confidence(tmp_path):
    nan = float("nan")
    run = log(tmp_path, loss=lambda t: nan if t == 17 else 1.0, flags=lambda t: ["nonfinite_loss"] if t == 17 else None)
    (d,) = [d for d in diagnose(run) if d.rule == "divergence"]
    assert d.confidence < 1 and "Training diverged" not in d.title and "finite again" in d.title
    run = log(tmp_path / "b", loss=lambda t: nan if t >= 17 else 1.0,
              flags=lambda t: ["nonfinite_loss"] if t >= 17 else None)
    (d,) = [d for d in diagnose(run) if d.rule == "divergence"]
    assert d.confidence == 1.0 and "Training diverged" in d.title


def test_exactly_zero_gradients_do_not_say_the_learning_rate_is_too_small(tmp_path):
    run = log(tmp_path, grad_norm=lambda t: 0.0, **{"grad_norm/0.weight": lambda t: 0.0},
              update_size=lambda t: 0.0, alpha=lambda t: -1.0)
    found = {d.rule: d for d in diagnose(run)}
    assert "lr_too_small" not in found, report(run)
    assert "dead_layers" in found


def test_a_run_whose_checks_were_all_nan_says_what_it_could_not_check(tmp_path):
    nan = float("nan")
    reasons = {"alpha": "alpha_fit: the parabola is not convex", "norm_test": "persample/conv.py: groups > 1",
               "inner_test": "persample/conv.py: groups > 1", "ortho_test": "persample/conv.py: groups > 1"}
    run = log(tmp_path, reasons=reasons, alpha=lambda t: nan, norm_test=lambda t: nan, inner_test=lambda t: nan,
              ortho_test=lambda t: nan)
    text = report(run)
    assert "No problem found by the rules this run's quantities allow" not in text
    assert "Could not check:" in text
    assert "alpha: NaN on 20 of the last 20 tracked steps (alpha_fit: the parabola is not convex (20x))" in text
    assert "norm_test: NaN on 20 of the last 20" in text and "persample/conv.py: groups > 1" in text
    assert "early_stopping: not recorded" in text


def test_a_short_run_is_not_called_nan(tmp_path):
    """Two finite values, fewer than the rules need: said as such (was "NaN on 0 of the last 2 tracked steps")."""
    run = log(tmp_path, n=2, alpha=lambda t: 0.1)
    text = report(run)
    assert "alpha: only 2 value(s) in the last 2 tracked steps, the rules need 5" in text
    assert "NaN on 0" not in text


def test_the_dashboard_panel_says_what_could_not_be_checked(tmp_path):
    pytest.importorskip("matplotlib")
    from cockpit_lite import dashboard

    nan = float("nan")
    run = log(tmp_path, reasons={"alpha": "alpha_fit: no step"}, alpha=lambda t: nan)
    fig = dashboard.render(run, instruments=["advisor"])
    text = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    text = " ".join(text.split())
    assert "Could not check" in text and "alpha_fit: no step" in text


def test_a_tiny_batch_gets_a_batch_to_measure_with_not_a_size_from_noise(tmp_path):
    rng = np.random.default_rng(3)
    noisy = 1.05 + 0.3 * rng.standard_normal(40)
    run = log(tmp_path, samples=lambda t: 2, norm_test=lambda t: float(noisy[t]))
    found = [d for d in diagnose(run) if d.rule == "gradient_noise_dominates"]
    if np.median(noisy[-20:]) > 1.0:
        (d,) = found
        assert d.confidence < 0.5 and "too small for the norm test to decide" in d.title
        assert "at least 32" in d.action and "(from 2" not in d.action
    else:
        assert not found
