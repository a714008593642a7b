"""benchmarks/floor.py: the hand-written minimal versions are a floor only if they compute the same
numbers as cockpit-lite; checked here on a few steps (the timing itself is the script's job)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import floor  # noqa: E402


def test_minimal_versions_compute_what_cockpit_lite_logs():
    worst = floor.check(steps=3)
    expected = {"grad_norm", "param_norm", "distance", "update_size", "norm_test", "inner_test", "ortho_test",
                "mean_gsnr", "alpha"}
    assert set(worst) == expected  # every quantity of the three sets was compared
    assert max(worst.values()) < 1e-3, worst


def test_the_timing_table_has_one_row_per_case():
    results = floor.measure(rounds=1, steps=1, cases=(("first-order", "sgd"), ("alpha", "adam")))
    text = floor.table(results)
    assert "| first-order | sgd |" in text and "| alpha | adam |" in text
    for r in results.values():
        assert r["plain"] > 0 and r["minimal"] > 0 and r["cockpit-lite"] > 0


def test_conv_floor_reports_every_conv_layer(monkeypatch):
    from benchmarks import problems

    small = problems.make("cnn", batch_size=4)  # the report's shape, not its timings
    monkeypatch.setattr(problems, "get", lambda name: small)
    r = floor.conv_floor(repeats=1)
    assert len(r["layers"]) == 3 and r["plain"] > 0
    for x in r["layers"]:
        assert x["weight_grad"] > 0 and x["forward"] > 0 and x["blocks"] > 0 and x["fused"] > 0 and x["method"] in ("grouped", "shifts")
    assert "| all |" in floor.conv_table(r)
