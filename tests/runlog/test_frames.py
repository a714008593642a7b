"""``Run.to_pandas()`` against the JSON lines of the log read by hand: one row per step, amendments
merged into their step, "NaN"/"Infinity" strings as floats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.runlog import RunLogWriter

pd = pytest.importorskip("pandas")


def _by_hand(path):
    """step -> {column: float}, from the raw lines: later lines of a step update its values."""
    rows = {}
    for line in open(path, encoding="utf-8"):
        rec = json.loads(line)
        if rec.get("type") != "step":
            continue
        row = rows.get(rec["step"])
        if row is None:
            row = rows[rec["step"]] = {f: float(rec[f]) for f in ("wall", "backward_passes", "samples") if f in rec}
        for key, v in rec.get("values", {}).items():
            row[key] = float(v)  # float("NaN"), float("Infinity") read the strings the writer uses
    return rows


def _assert_frame_matches(frame, rows):
    assert frame.index.name == "step"
    assert list(frame.index) == sorted(rows)
    assert frame.index.is_unique
    for col in frame.columns:
        assert frame[col].dtype == np.float64, col
    columns = {k for row in rows.values() for k in row}
    assert columns == set(frame.columns)
    for step, row in rows.items():
        for col in frame.columns:
            want = row.get(col, math.nan)
            got = frame.at[step, col]
            assert (math.isnan(want) and math.isnan(got)) or got == want, (step, col, got, want)


def test_handwritten_log_with_amendments_nan_and_infinity(tmp_path):
    w = RunLogWriter(tmp_path, {"quantities": {"loss": {}, "alpha": {}, "grad_norm": {}}})
    w.write({"type": "step", "step": 0, "wall": 1.0, "backward_passes": 1, "samples": 8,
             "values": {"loss": 2.0, "grad_norm": math.nan}, "reasons": {"grad_norm": "why"}})
    w.write({"type": "step", "step": 1, "wall": 2.0, "backward_passes": 2, "samples": 16,
             "values": {"loss": math.inf, "grad_norm": 1.5, "grad_norm/w": 1.0}})
    w.write({"type": "step", "step": 0, "amends": True, "wall": 2.0, "values": {"alpha": 0.25}})
    w.write({"type": "skipped", "step": 2, "wall": 3.0, "reason": "inf"})
    w.write({"type": "step", "step": 4, "amends": True, "wall": 4.0, "values": {"alpha": math.nan}})
    w.write({"type": "step", "step": 3, "wall": 4.0, "backward_passes": 1, "values": {"loss": 1.0}})
    w.write({"type": "step", "step": 1, "amends": True, "wall": 5.0, "values": {"alpha": -0.5}})
    w.close()
    frame = cockpit_lite.load(tmp_path).to_pandas()
    _assert_frame_matches(frame, _by_hand(tmp_path / "cockpit.jsonl"))
    assert list(frame.index) == [0, 1, 3, 4]
    assert frame.at[0, "alpha"] == 0.25 and frame.at[1, "alpha"] == -0.5
    assert math.isinf(frame.at[1, "loss"]) and math.isnan(frame.at[0, "grad_norm"])
    # pd.read_json gives duplicate rows and strings for the same log: what to_pandas is for
    raw = pd.read_json(tmp_path / "cockpit.jsonl", lines=True)
    assert (raw["type"] == "step").sum() > len(frame)


def test_real_run_with_alpha_amendments(tmp_path):
    torch.manual_seed(0)
    model, loss_fn = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path,
                            quantities={"loss": "every", "grad_norm": "every", "alpha": "every:2"}):
        for _ in range(5):
            x, y = torch.randn(8, 4, generator=g), torch.randint(0, 2, (8,), generator=g)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path)
    frame = run.to_pandas()
    _assert_frame_matches(frame, _by_hand(tmp_path / "cockpit.jsonl"))
    steps, alpha = run.series("alpha")
    np.testing.assert_array_equal(frame["alpha"].dropna().index, steps[~np.isnan(alpha)])


def test_selected_keys_and_typos(tmp_path):
    w = RunLogWriter(tmp_path, {"quantities": {"loss": {}}})
    w.write({"type": "step", "step": 0, "wall": 1.0, "values": {"loss": 2.0}})
    w.close()
    run = cockpit_lite.load(tmp_path)
    frame = run.to_pandas(["loss", "grad_norm"], fields=False)
    assert list(frame.columns) == ["loss", "grad_norm"]  # a known quantity without values: a NaN column
    assert frame.at[0, "loss"] == 2.0 and math.isnan(frame.at[0, "grad_norm"])
    with pytest.raises(KeyError, match="did you mean 'loss'"):
        run.to_pandas(["losss"])
    assert run.has("loss") and not run.has("losss") and not run.has("grad_norm")


def test_cached_large_log_gives_the_same_frame(tmp_path, monkeypatch):
    from cockpit_lite.runlog.cache import RunCache
    from cockpit_lite.testing import write_synthetic_log

    monkeypatch.setattr(RunCache, "MIN_BYTES", 1000)  # a cache for this small log too

    write_synthetic_log(tmp_path, 3000, quantities=["loss", "grad_norm", "alpha"])
    first = cockpit_lite.load(tmp_path).to_pandas()  # decodes and writes the cache
    cached = cockpit_lite.load(tmp_path)
    assert cached._cached is not None  # read from the cache, not decoded
    second = cached.to_pandas()
    pd.testing.assert_frame_equal(first, second)
    _assert_frame_matches(second, _by_hand(tmp_path / "cockpit.jsonl"))
