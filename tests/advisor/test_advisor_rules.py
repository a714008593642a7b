"""Each advisor rule on a hand-made log: it fires on its pattern, stays silent otherwise."""

import math

import pytest

import cockpit_lite
from cockpit_lite.advisor import diagnose, report
from cockpit_lite.runlog import RunLogWriter

PARAMS = [{"name": "0.weight", "shape": [4, 4], "numel": 16}, {"name": "1.weight", "shape": [2, 4], "numel": 8}]


def log(tmp_path, n=40, optimizer="SGD", momentum=0.0, data=None, **series):
    """series: key -> callable(step) -> value (or None to leave it out); data: key -> callable(step) -> the
    step's ``data`` structure (or None)."""
    w = RunLogWriter(tmp_path, {"optimizer": optimizer, "optimizer_defaults": {"momentum": momentum},
                                "params": PARAMS})
    base = {"loss": lambda t: 2.0 * math.exp(-t / 30) + 0.1, "lr": lambda t: 0.1,
            "grad_norm": lambda t: 1.0, "grad_norm/0.weight": lambda t: 0.8, "grad_norm/1.weight": lambda t: 0.6,
            "param_norm": lambda t: 5.0, "param_norm/0.weight": lambda t: 4.0, "param_norm/1.weight": lambda t: 3.0,
            "update_size": lambda t: 0.05, "time": lambda t: 0.01}
    base.update(series)
    for t in range(n):
        values = {k: f(t) for k, f in base.items() if f is not None and f(t) is not None}
        rec = {"type": "step", "step": t, "values": values, "samples": 32}
        structures = {k: f(t) for k, f in (data or {}).items() if f(t) is not None}
        if structures:
            rec["data"] = structures
        if any(isinstance(v, float) and not math.isfinite(v) for k, v in values.items() if k in ("loss", "grad_norm")):
            rec["flags"] = ["nonfinite_loss"]
        w.write(rec)
    w.close({"steps": n})
    return cockpit_lite.load(tmp_path)


def rules(run, **th):
    return [d.rule for d in diagnose(run, th or None)]


def test_healthy_log_raises_nothing(tmp_path):
    run = log(tmp_path, alpha=lambda t: 0.0 + 0.2 * math.sin(t), norm_test=lambda t: 0.4,
              inner_test=lambda t: 0.3, ortho_test=lambda t: 0.5, early_stopping=lambda t: -1.0)
    assert rules(run) == []
    assert "No problem found" in report(run)


def test_lr_too_large_from_alpha_and_curvature(tmp_path):
    run = log(tmp_path, alpha=lambda t: 0.9, hess_max_ev=lambda t: 50.0)
    found = diagnose(run)
    assert found[0].rule == "lr_too_large"
    quantities = {e["quantity"] for e in found[0].evidence}
    assert quantities == {"alpha", "hess_max_ev"}
    assert found[0].confidence > 0.9
    # with momentum 0.9 the stability edge is 2 * 1.9 / 0.1 = 38 < 50: still too large
    assert "lr_too_large" in rules(log(tmp_path / "m", momentum=0.9, hess_max_ev=lambda t: 50.0))
    assert "lr_too_large" not in rules(log(tmp_path / "ok", hess_max_ev=lambda t: 10.0))


def test_lr_too_large_from_loss_spikes(tmp_path):
    run = log(tmp_path, loss=lambda t: 10.0 if t % 4 == 0 else 1.0)
    assert "lr_too_large" in rules(run)


def test_lr_too_small(tmp_path):
    run = log(tmp_path, alpha=lambda t: -0.98, update_size=lambda t: 1e-6)
    d = [x for x in diagnose(run) if x.rule == "lr_too_small"][0]
    assert len(d.evidence) == 2
    assert rules(log(tmp_path / "a", alpha=lambda t: -0.5)) == []


def test_gradient_noise_and_batch_suggestion(tmp_path):
    run = log(tmp_path, norm_test=lambda t: 3.0, inner_test=lambda t: 1.0, ortho_test=lambda t: 2.0)
    d = [x for x in diagnose(run) if x.rule == "gradient_noise_dominates"][0]
    assert "288" in d.action  # 32 * 3^2
    run = log(tmp_path / "small", norm_test=lambda t: 0.01, inner_test=lambda t: 0.01, ortho_test=lambda t: 0.02)
    assert rules(run) == ["batch_larger_than_needed"]
    assert rules(run, tests_low=0.005) == []  # thresholds are configurable


def test_exploding_vanishing_dead(tmp_path):
    run = log(tmp_path, **{"grad_norm/0.weight": lambda t: 400.0, "grad_norm": lambda t: 400.0})
    d = [x for x in diagnose(run) if x.rule == "exploding_gradients"][0]
    assert "0.weight" in d.title and "1.weight" not in d.title
    run = log(tmp_path / "v", **{"grad_norm/0.weight": lambda t: 1e-9})
    assert rules(run) == ["vanishing_gradients"]
    run = log(tmp_path / "d", **{"grad_norm/1.weight": lambda t: 0.0})
    d = diagnose(run)
    assert [x.rule for x in d] == ["dead_layers"] and "1.weight" in d[0].title


def test_divergence_names_step_and_first_layer(tmp_path):
    nan = float("nan")
    run = log(tmp_path, loss=lambda t: nan if t >= 25 else 1.0,
              **{"grad_norm/1.weight": lambda t: nan if t >= 25 else 0.5,
                 "grad_norm/0.weight": lambda t: nan if t >= 26 else 0.5})
    d = diagnose(run)[0]
    assert d.rule == "divergence" and d.step == 25
    assert "1.weight" in d.title and "step 25" in d.title


def test_overfitting_signal(tmp_path):
    run = log(tmp_path, early_stopping=lambda t: 0.3)
    assert rules(run) == ["overfitting_signal"]


def test_rising_cost_uses_time_when_energy_is_unavailable(tmp_path):
    # fast progress for 60 steps, then a flat loss for 60 steps at the same cost
    run = log(tmp_path, n=120, loss=lambda t: 3.0 - 0.04 * t if t < 60 else 0.6)
    d = [x for x in diagnose(run) if x.rule == "rising_cost"]
    assert d and "time used" in d[0].title
    assert "rising_cost" not in rules(log(tmp_path / "p", n=120, loss=lambda t: 3.0 - 0.02 * t))


def test_unknown_threshold_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown advisor thresholds"):
        diagnose(log(tmp_path), {"alpha_hgh": 1})


def test_cli_diagnose_prints_the_report(tmp_path, capsys):
    from cockpit_lite.cli import main

    run = log(tmp_path, alpha=lambda t: 0.9)
    assert main(["diagnose", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "The learning rate is too large" in out and "evidence: alpha median > 0.5" in out
    assert main(["diagnose", str(tmp_path), "--threshold", "alpha_high=2"]) == 0
    assert "No problem found" in capsys.readouterr().out
    assert main(["diagnose", str(tmp_path), "--threshold", "alpha_hgh=2"]) == 2
    assert run.finished


def test_dashboard_has_an_advisor_panel_with_the_diagnoses(tmp_path):
    from cockpit_lite.instruments.advisor import Advisor
    from cockpit_lite import dashboard

    run = log(tmp_path, alpha=lambda t: 0.9)
    fig = dashboard.render(run, tmp_path / "d.png")
    axes = [ax for ax in fig.get_axes() if ax.get_title() == Advisor.title]
    assert len(axes) == 1
    text = "\n".join(t.get_text() for t in axes[0].texts)
    assert "The learning rate is too large" in text and "Lower the learning rate" in text
    healthy = log(tmp_path / "h", alpha=lambda t: 0.0)
    fig = dashboard.render(healthy, tmp_path / "h.png", instruments=["advisor"])
    assert "No problem found" in "\n".join(t.get_text() for ax in fig.get_axes() for t in ax.texts)


def test_live_checks_thin_out_as_the_run_grows_and_the_first_alarm_is_immediate(monkeypatch):
    from cockpit_lite.advisor.live import AdvisorSink

    sink = AdvisorSink("unused", lambda *a, **k: None, every=25)
    checked = []
    monkeypatch.setattr(sink, "check", lambda: checked.append(sink._records))
    for t in range(100_000):
        flags = ["nonfinite_loss"] if t >= 5000 else []
        sink.write({"type": "step", "step": t, "values": {}, "flags": flags})
    assert checked[:3] == [25, 50, 75]
    assert 5001 in checked  # the first flagged step, at once
    assert len(checked) < 150  # not every 25 steps (4,000 checks), not every flagged step
    assert all(b - a >= 25 for a, b in zip(checked, checked[1:]))


def test_exploding_gradients_pairs_the_norms_by_step_not_by_position(tmp_path):
    """param_norm logged every 10 steps, grad_norm every step: the ratio at step t must use param_norm of
    step t. Here the gradients are large only at steps whose param_norm is not logged; the logged steps
    have a ratio of 0.01, so nothing explodes."""
    run = log(tmp_path, n=60,
              **{"grad_norm/0.weight": lambda t: 0.05 if t % 10 == 0 else 500.0,
                 "param_norm/0.weight": lambda t: 5.0 if t % 10 == 0 else None})
    assert "exploding_gradients" not in rules(run)


def test_divergence_names_the_earliest_of_a_skipped_and_a_flagged_step(tmp_path):
    w = RunLogWriter(tmp_path, {"optimizer": "SGD", "optimizer_defaults": {}, "params": PARAMS})
    for t in range(60):
        if t == 10:
            w.write({"type": "skipped", "step": t, "reason": "zero_grad() was called after backward() without "
                     "optimizer.step(); gradients were not finite in 0.weight (a GradScaler skips such steps)"})
            continue
        loss = float("nan") if t == 50 else 1.0
        rec = {"type": "step", "step": t, "values": {"loss": loss}}
        if t == 50:
            rec["flags"] = ["nonfinite_loss"]
        w.write(rec)
    w.close({"steps": 60})
    (d,) = [d for d in diagnose(cockpit_lite.load(tmp_path)) if d.rule == "divergence"]
    assert d.step == 10 and "first at step 10" in d.title


def test_alpha_of_minus_one_by_definition_is_no_evidence(tmp_path):
    """alpha = -1 where the fitted parabola is not convex (or no step was taken) is a convention, not a
    measurement of the step size: it must not make the advisor say "raise the learning rate"."""
    concave = {"alpha": lambda t: {"case": "not_convex", "w": [1.0, -0.5, -0.9]}}
    assert "lr_too_small" not in rules(log(tmp_path, alpha=lambda t: -1.0, data=concave))
    fitted = {"alpha": lambda t: {"case": "fit", "w": [1.0, -0.5, 40.0]}}
    assert "lr_too_small" in rules(log(tmp_path / "fit", alpha=lambda t: -0.98, data=fitted))


def test_an_eigenvalue_of_a_sub_batch_is_not_a_lower_bound(tmp_path):
    """HessMaxEV(subbatch=k): the top eigenvalue of k samples' Hessian is no lower bound of the batch's, so it is
    not evidence that the step is past the stability edge 2/lr (it was: the same run read 0.98 on the full batch
    and 2.65 on sub-batches of 2, above the edge 1.82)."""
    sub = {"hess_max_ev": lambda t: {"subbatch": 2, "converged": True}}
    assert "lr_too_large" not in rules(log(tmp_path, hess_max_ev=lambda t: 50.0, data=sub))
    full = {"hess_max_ev": lambda t: {"subbatch": None, "converged": True}}
    assert "lr_too_large" in rules(log(tmp_path / "full", hess_max_ev=lambda t: 50.0, data=full))


def test_rising_cost_pairs_cost_and_loss_by_step(tmp_path):
    """Energy logged every 10 steps (a sparse schedule), the loss every step. Paired by position, the energy of steps
    1080-1190 was divided by the loss decrease of steps 1188-1199: a loss flat over its last 6 steps only read as a
    stall at the same cost. Paired by step, the steps with an energy value are all still making progress."""
    run = log(tmp_path, n=1200, loss=lambda t: 5.0 - 0.004 * min(t, 1193), time=None,
              energy=lambda t: 1.0 if t % 10 == 0 else None)
    assert "rising_cost" not in rules(run, window=2)
    stalled = log(tmp_path / "stall", n=1200, loss=lambda t: 5.0 - 0.004 * min(t, 1135), time=None,
                  energy=lambda t: 1.0 if t % 10 == 0 else None)
    assert "rising_cost" in rules(stalled, window=2)
