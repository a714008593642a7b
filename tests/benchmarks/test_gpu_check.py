"""The one-shot GPU check (benchmarks/gpu_check.py, issue 23), on the CPU: its comparison rules
against hand-made logs, its stage control (time limits, budget), and the whole pipeline as a dry run
(``--device cpu --tiny``) with the structure of what it writes. The GPU itself is not needed here."""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check, gpu_common, gpu_syncs, gpu_values  # noqa: E402


class FakeRun:
    """What the comparison reads of a run log: keys, series, reasons, data."""

    def __init__(self, series, reasons=None, data=None):
        self._series, self._reasons, self._data = series, reasons or {}, data or {}

    def keys(self):
        return list(self._series)

    def series(self, key):
        steps, values = self._series[key]
        return np.asarray(steps), np.asarray(values, dtype=float)

    def reasons(self, key):
        return self._reasons.get(key, {})

    def data(self, key):
        return self._data.get(key, [])


def _rows(ref, other):
    return {r["key"]: r for r in gpu_values.compare_scalars(FakeRun(ref), FakeRun(other))}


def test_values_agree_within_the_relative_tolerance_and_not_beyond():
    ref = {"grad_norm": ([0, 1], [2.0, 3.0])}
    assert _rows(ref, {"grad_norm": ([0, 1], [2.0 * (1 + 5e-5), 3.0])})["grad_norm"]["ok"]
    row = _rows(ref, {"grad_norm": ([0, 1], [2.0, 3.0 * (1 + 3e-4)])})["grad_norm"]
    assert not row["ok"] and row["worst_step"] == 1 and row["worst"] == pytest.approx(3e-4, rel=1e-2)


def test_alpha_is_judged_in_absolute_terms_and_hess_max_ev_at_the_lanczos_tolerance():
    ref = {"alpha": ([0], [0.0]), "hess_max_ev": ([0], [10.0])}
    rows = _rows(ref, {"alpha": ([0], [5e-4]), "hess_max_ev": ([0], [10.005])})
    assert rows["alpha"]["ok"] and rows["hess_max_ev"]["ok"]
    rows = _rows(ref, {"alpha": ([0], [2e-3]), "hess_max_ev": ([0], [10.02])})
    assert not rows["alpha"]["ok"] and not rows["hess_max_ev"]["ok"]


def test_a_value_near_zero_is_judged_against_its_series():
    # distance is 0 at step 0 and ~1 later: 1e-9 of rounding at step 0 is no disagreement
    ref = {"distance": ([0, 1], [0.0, 1.0])}
    assert _rows(ref, {"distance": ([0, 1], [1e-9, 1.0])})["distance"]["ok"]
    assert not _rows(ref, {"distance": ([0, 1], [1e-6, 1.0])})["distance"]["ok"]


def test_nan_on_one_side_only_fails_with_its_reason_and_nan_on_both_agrees():
    ref = {"tic_diag": ([0], [float("nan")]), "loss": ([0], [1.0])}
    both = _rows(ref, {"tic_diag": ([0], [float("nan")]), "loss": ([0], [1.0])})
    assert both["tic_diag"]["ok"]
    run_gpu = FakeRun({"tic_diag": ([0], [float("nan")]), "loss": ([0], [1.0])},
                      reasons={"tic_diag": {0: "double backward not supported by this kernel"}})
    rows = {r["key"]: r for r in gpu_values.compare_scalars(FakeRun({"tic_diag": ([0], [5.0]), "loss": ([0], [1.0])}), run_gpu)}
    assert not rows["tic_diag"]["ok"] and "GPU side only" in rows["tic_diag"]["note"] and "double backward" in rows["tic_diag"]["note"]


def test_a_key_on_one_side_or_missing_steps_fail_and_device_keys_are_not_compared():
    ref = {"loss": ([0, 1], [1.0, 1.0]), "time": ([0], [0.1]), "energy/gpu0": ([0], [1.0]), "hess_max_ev/hvps": ([0], [7])}
    rows = _rows(ref, {"loss": ([0], [1.0]), "grad_norm": ([0], [1.0]), "time": ([0], [0.5])})
    assert not rows["loss"]["ok"] and "steps differ" in rows["loss"]["note"]
    assert not rows["grad_norm"]["ok"] and "GPU side only" in rows["grad_norm"]["note"]
    assert not ({"time", "energy/gpu0", "hess_max_ev/hvps"} & set(rows))


def test_an_estimate_beyond_the_tolerance_is_not_passed_but_said_to_be_within_its_standard_error():
    ref = {"hess_trace": ([0], [100.0]), "hess_trace/stderr": ([0], [1.0])}
    row = _rows(ref, {"hess_trace": ([0], [100.5]), "hess_trace/stderr": ([0], [1.0])})["hess_trace"]
    assert not row["ok"] and "within the standard error" in row["note"] and "SE" in row["rule"]


def test_histograms_allow_a_few_samples_on_bin_edges_only():
    def hist(counts):
        return [(0, {"edges": [0.0, 1.0, 2.0], "counts": counts})]

    a = FakeRun({}, data={"grad_hist_1d": hist([5000, 5000])})
    (row,) = gpu_values.compare_histograms(a, FakeRun({}, data={"grad_hist_1d": hist([4999, 5001])}))
    assert row["ok"] and row["worst_moved"] == pytest.approx(1e-4)
    (row,) = gpu_values.compare_histograms(a, FakeRun({}, data={"grad_hist_1d": hist([4900, 5100])}))
    assert not row["ok"]


def test_sync_events_are_the_blocking_cuda_calls():
    for name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"):
        assert gpu_syncs.is_sync_event(name)
    for name in ("cudaLaunchKernel", "cudaMemcpyAsync", "cudaEventQuery", "aten::item", "cudaEventRecord"):
        assert not gpu_syncs.is_sync_event(name)


def test_the_cuda_test_files_are_found():
    files = gpu_check.cuda_test_files()
    assert "tests/energy/test_energy_time_device.py" in files and "tests/energy/test_energy_quantity.py" in files


def _args(tmp_path, **kw):
    return types.SimpleNamespace(device="cpu", tiny=True, out=str(tmp_path), **kw)


def test_a_stage_past_its_time_limit_is_stopped_and_reported(tmp_path):
    result = gpu_check.run_stage("env", _args(tmp_path), 0.3, str(tmp_path))  # torch alone takes longer to import
    (c,) = result["checks"]
    assert c["status"] == gpu_common.FAIL and "time limit" in c["detail"]


def test_a_spent_budget_skips_the_stages_and_still_writes_the_summary(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path), "--budget-s", "5"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["stages"]) == set(gpu_check.STAGES)
    assert {c["status"] for c in summary["checks"]} == {gpu_common.SKIPPED}
    assert "Dry run on the CPU" not in (tmp_path / "gpu_block.md").read_text()  # no timing rows at all
    assert "No timing figures" in (tmp_path / "gpu_block.md").read_text()


def test_a_dry_run_block_is_never_pasted_into_the_docs(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("a\n<!-- benchmarks-gpu:start (generated by benchmarks/run.py) -->\nnone\n<!-- benchmarks-gpu:end -->\n")
    dry = tmp_path / "dry.md"
    dry.write_text("**Dry run on the CPU (no CUDA device): not GPU figures**\n| x |")
    with pytest.raises(SystemExit, match="dry run"):
        gpu_check.apply_block(str(dry), docs=str(docs))
    real = tmp_path / "real.md"
    real.write_text("Measured on the GPU NVIDIA H100\n| x |\n")
    gpu_check.apply_block(str(real), docs=str(docs))
    assert "NVIDIA H100" in docs.read_text() and "none" not in docs.read_text()


@pytest.mark.slow
def test_the_whole_check_runs_on_the_cpu_and_writes_what_a_gpu_run_writes(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OUT=str(out))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    # the device tool returns at most 8 files, named in letters, digits, '.', '_' and '-'
    assert len(files) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"summary.json", "summary.md", "gpu_block.md", "gpu_check.log", "values.json", "timing.json"} <= set(files)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["stages"]) == set(gpu_check.STAGES)
    statuses = {c["stage"]: [] for c in summary["checks"]}
    for c in summary["checks"]:
        assert c["status"] in (gpu_common.PASS, gpu_common.FAIL, gpu_common.SKIPPED) and c["detail"]
        statuses[c["stage"]].append(c["status"])
    assert not [c for c in summary["checks"] if c["status"] == gpu_common.FAIL], summary["checks"]
    # the value comparison runs for real (CPU against CPU); the GPU-only checks say why they skipped
    assert statuses["values"] == [gpu_common.PASS, gpu_common.PASS]
    for stage in ("syncs", "energy", "cuda_tests", "timing"):
        assert gpu_common.SKIPPED in statuses[stage]
    energy = summary["stages"]["energy"]["figures"]
    assert energy["counter"] == "simulated" and energy["short steps (cnn)"]["measured"] > 0
    assert "Dry run on the CPU" in (out / "gpu_block.md").read_text()
    assert "stage timing" in (out / "gpu_check.log").read_text()
    values = json.loads((out / "values.json").read_text())
    assert {p["problem"] for p in values["problems"]} == {"demo", "transformer"}


@pytest.mark.slow
def test_the_gpu_branches_of_syncs_and_energy_report_on_fake_counts(tmp_path, monkeypatch):
    """The GPU-only analysis runs once, on a machine lent for minutes: here it runs on the CPU with
    the device calls replaced (sync counts: 0 on plain steps, 1 on step 5; a simulated counter)."""
    from benchmarks import gpu_energy

    monkeypatch.setattr(gpu_common, "cuda_ok", lambda device: True)
    monkeypatch.setattr(gpu_syncs.torch.cuda, "synchronize", lambda *a: None)
    calls = {"n": 0}

    def fake_warnings(fn):
        fn()
        calls["n"] += 1
        return 1 if calls["n"] == 3 + 1 + 5 else 0  # 3 plain steps, then steps 0.. of every:4: step 5 syncs

    monkeypatch.setattr(gpu_syncs, "count_sync_warnings", fake_warnings)
    monkeypatch.setattr(gpu_syncs, "count_profiler_syncs", lambda fn: fn() or 0)
    make = gpu_syncs.problems.make
    monkeypatch.setattr(gpu_syncs.problems, "make", lambda name, batch_size=None: make("mlp", batch_size=4))
    result = gpu_syncs.run("cpu", True, str(tmp_path))
    (c,) = result["checks"]
    assert c["status"] == gpu_common.FAIL and "(1, 0)" in c["detail"]

    monkeypatch.setattr(gpu_energy.problems, "make", lambda name, batch_size=None: make("mlp", batch_size=4))
    monkeypatch.setattr(gpu_energy, "open_counter", lambda cuda: (gpu_energy.SimulatedCounter(), "simulated", lambda: None))
    monkeypatch.setattr(gpu_energy, "energy_quantity", lambda cuda, read: gpu_energy.Energy(
        nvml_counter=lambda i: (read, "simulated"), make_event=lambda i: gpu_energy.DoneEvent()))
    result = gpu_energy.run("cpu", True, str(tmp_path))
    statuses = {c["name"]: c["status"] for c in result["checks"]}
    assert statuses["energy labelled on every step, short steps (cnn)"] == gpu_common.PASS
    assert statuses["energy sum vs counter read directly, short steps (cnn)"] == gpu_common.PASS
    assert all(s in (gpu_common.PASS, gpu_common.FAIL, gpu_common.SKIPPED) for s in statuses.values())
