"""Data-parallel runs (DDP over gloo, two CPU processes) log the statistics of the global batch: every
quantity equals what one process computes on the concatenated batch (tests/ddp_worker.py)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import cockpit_lite
from helpers import wait_for_processes
from layout import TESTS

WORKER = str(TESTS / "ddp_worker.py")
# tic_diag = sum_j M_j / (c_j + 1e-7) adds terms of both signs divided by tiny Hessian diagonal entries, each
# a cancelling float32 sum over samples: a different summation order (two shards) moves such c_j by up to
# 1.3e-4 relative (measured on this net), the total by up to that fraction of abs_terms = sum_j |term_j|
# (logged with it): at step 2 of "sgd" the value is -69.5 from terms summing to 3876, and the two runs
# differed by 7.5e-4 of the value, 1.3e-5 of abs_terms. A tolerance relative to the value itself fails
# on CPUs whose float32 kernels sum in another order; 3e-4 of abs_terms is the first-order worst case
# (every term off by the largest relative change of c_j seen, same sign) with a margin of 2.
ABS_TERMS_TOL = {"tic_diag": 3e-4}


def _run(args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, WORKER, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=240):
    wait_for_processes(procs, "a DDP worker", timeout)


@pytest.fixture(scope="module", params=["sgd", "adam-accum"])
def runs(request, tmp_path_factory):
    """(one process, two DDP processes, the DDP logdir) for plain SGD, and for Adam with two
    accumulated micro-batches per step."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    mode = request.param
    tmp = tmp_path_factory.mktemp(f"ddp-{mode}")
    single, multi = tmp / "single", tmp / "multi"
    procs = [_run([0, 1, "-", single, mode])]
    procs += [_run([r, 2, tmp / "init", multi, mode]) for r in range(2)]
    _wait(procs)
    return cockpit_lite.load(single), cockpit_lite.load(multi), multi


def _steps(run):
    return [r for r in run.records if r.get("type") == "step"]


def test_process_zero_writes_the_only_log(runs):
    _, multi, logdir = runs
    assert sorted(os.listdir(logdir)) == ["cockpit.jsonl"]
    assert multi.header["processes"] == 2
    assert len(_steps(multi)) == 3


def test_every_quantity_equals_one_process_on_the_concatenated_batch(runs):
    single, multi, _ = runs
    a, b = _steps(single), _steps(multi)
    assert len(a) == len(b) == 3
    families = set()
    for x, y in zip(a, b):
        assert set(x["values"]) == set(y["values"])
        reasons = x.get("reasons", {})
        assert reasons == y.get("reasons", {})
        # CABS is defined for plain SGD only; energy counters are not readable on CI machines
        assert {k for k in reasons if not k.startswith("energy")} <= {"cabs"}, reasons
        for key, v in x["values"].items():
            w = y["values"][key]
            families.add(key.split("/")[0])
            if key in reasons:
                continue
            assert math.isfinite(v), key
            if key in ABS_TERMS_TOL:
                scale = max(x["data"][key]["abs_terms"], y["data"][key]["abs_terms"])
                assert abs(v - w) <= ABS_TERMS_TOL[key] * scale, (x["step"], key, v, w, scale)
                continue
            assert abs(v - w) <= 1e-5 * max(abs(v), abs(w)) + 1e-9, (x["step"], key, v, w)
    # the per-sample and curvature families are all there (not only the first-order ones)
    assert {"loss", "grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping",
            "cabs", "alpha", "hess_max_ev", "hess_trace", "ggn_trace", "tic_diag", "tic_trace"} <= families


def test_histograms_add_up_over_the_processes(runs):
    single, multi, _ = runs
    for x, y in zip(_steps(single), _steps(multi)):
        h1, h2 = x["data"]["grad_hist_1d"], y["data"]["grad_hist_1d"]
        assert h1["edges"] == pytest.approx(h2["edges"], rel=1e-6)
        assert sum(h1["counts"]) == sum(h2["counts"]) == 16 * sum(p["numel"] for p in single.header["params"])
        # an element within rounding of a bin edge may land in the neighbouring bin
        assert sum(abs(c1 - c2) for c1, c2 in zip(h1["counts"], h2["counts"])) <= 4
        j1, j2 = x["data"]["grad_hist_2d"], y["data"]["grad_hist_2d"]
        assert j1["x_edges"] == pytest.approx(j2["x_edges"], rel=1e-6)
        c1 = torch.tensor(j1["counts"]).flatten()
        c2 = torch.tensor(j2["counts"]).flatten()
        assert float(c1.sum()) == float(c2.sum())
        assert float((c1 - c2).abs().sum()) <= 4


def test_energy_says_whose_devices_it_counts(runs):
    single, multi, _ = runs
    for x, y in zip(_steps(single), _steps(multi)):
        assert "scope" not in x["data"]["energy"]["total"]
        assert "process 0 only, of 2 processes" in y["data"]["energy"]["total"]["scope"]
    # at close, every process's totals, combined per physical device (both share this host's CPU)
    (last, combined), = multi.data("energy_all_processes")
    assert last == _steps(multi)[-1]["step"] and combined["processes"] == 2
    shared = {**combined["devices"], **{i: None for i in combined["unavailable"]}}
    cpu = [i for i in shared if i.endswith(":cpu") or ":cpu0" in i]
    assert len(cpu) >= 1  # one entry for the socket, not one per process
    assert not single.data("energy_all_processes")


def test_watch_unwraps_ddp_and_keeps_single_process_names(runs):
    single, multi, _ = runs
    assert [p["name"] for p in multi.header["params"]] == [p["name"] for p in single.header["params"]]
    assert not any(p["name"].startswith("module.") for p in multi.header["params"])


def test_a_failure_in_one_process_neither_hangs_nor_corrupts(tmp_path):
    """A quantity raises in process 1 only, between reductions the others make (tests/ddp_worker.py,
    mode "flaky"). The processes meet at the next reduction header, see that they are out of step and
    skip the rest of that step's statistics (NaN with the reason); training is untouched (the
    cockpit's reductions have their own process group) and the next step's statistics are right."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [_run([0, 1, "-", single, "flaky"])]
    procs += [_run([r, 2, tmp_path / "init", multi, "flaky"]) for r in range(2)]
    _wait(procs, timeout=120)
    one, two = cockpit_lite.load(single), cockpit_lite.load(multi)
    for key in ("norm_test", "inner_test", "mean_gsnr", "flaky"):
        steps, values = two.series(key)
        assert list(steps) == [0, 1, 2]
        assert math.isnan(values[1]) and "out of step" in two.reasons(key)[1], (key, two.reasons(key))
        ref = [2.0] * 3 if key == "flaky" else one.series(key)[1]  # flaky counts the processes
        for s in (0, 2):
            assert math.isclose(values[s], ref[s], rel_tol=1e-5), (key, s, values[s], ref[s])
    # quantities that do not reduce are unaffected
    assert not math.isnan(two.series("grad_norm")[1][1])
    # DDP's own gradient reductions were never paired with the cockpit's: training as in one process
    for a, b in zip(torch.load(single / "params.pt"), torch.load(multi / "params.pt")):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_failure_in_the_writing_process_marks_what_no_check_confirmed(tmp_path):
    """A quantity raises in process 0 (the writer) only, before its reduction, and the next quantity makes
    no reduction (tests/ddp_worker.py, mode "flaky0"): process 0 meets process 1 only at the hook's
    closing check. Process 0 then reports NaN for what ran after the point process 1 was left at (its
    value had no check behind it), keeps what came before (loss: every process had passed it), and the
    next step is whole again."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [_run([0, 1, "-", single, "flaky0"])]
    procs += [_run([r, 2, tmp_path / "init", multi, "flaky0"]) for r in range(2)]
    _wait(procs, timeout=120)
    one, two = cockpit_lite.load(single), cockpit_lite.load(multi)
    assert "fails in process 0 only" in two.reasons("flaky")[1]
    assert "out of step" in two.reasons("quiet")[1], two.reasons("quiet")
    for key in ("flaky", "quiet"):
        values = two.series(key)[1]
        assert math.isnan(values[1]) and values[0] == values[2] == (2.0 if key == "flaky" else 1.0), (key, values)
    for key in ("loss", "grad_norm"):  # confirmed (loss) or not reducing (grad_norm): as in one process
        steps, values = two.series(key)
        assert list(steps) == [0, 1, 2]
        for s, (v, w) in enumerate(zip(values, one.series(key)[1])):
            assert math.isclose(v, w, rel_tol=1e-5), (key, s, v, w)


def test_declared_sums_failing_in_one_process_are_reported_not_partial(tmp_path):
    """The loss's declared sums (summed in the hook's closing check) raise in process 1 only at step 1
    (tests/ddp_worker.py, mode "sumsfail"): the loss of that step is NaN, saying so, never the sum of
    process 0's shard alone; the other quantities of the step, and the next step, are as in one process."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    procs = [_run([0, 1, "-", single, "sumsfail"])]
    procs += [_run([r, 2, tmp_path / "init", multi, "sumsfail"]) for r in range(2)]
    _wait(procs, timeout=120)
    one, two = cockpit_lite.load(single), cockpit_lite.load(multi)
    loss = two.series("loss")[1]
    assert math.isnan(loss[1]) and "failed in 1 of 2 processes" in two.reasons("loss")[1], two.reasons("loss")
    for s in (0, 2):
        assert math.isclose(loss[s], one.series("loss")[1][s], rel_tol=1e-5)
    norm = two.series("norm_test")[1]
    assert all(math.isclose(v, w, rel_tol=1e-5) for v, w in zip(norm, one.series("norm_test")[1])), norm
    for (_, h1), (_, h2) in zip(one.data("grad_hist_1d"), two.data("grad_hist_1d")):
        assert sum(h1["counts"]) == sum(h2["counts"]) > 0


def test_a_backpack_failure_in_one_process_switches_every_process_to_the_estimator(tmp_path):
    """BackPACK raises in process 1 only at step 1 (tests/ddp_worker.py, mode "bpfail"): every process
    drops the exact diagonal together, so their reductions stay matched and nothing is mislabelled.
    From step 1 on the trace is the Hutchinson estimate, equal to a run with the estimator forced
    (probes are drawn per step, alike in every process)."""
    multi, forced = tmp_path / "multi", tmp_path / "forced"
    procs = [_run([r, 2, tmp_path / "init", multi, "bpfail"]) for r in range(2)]
    _wait(procs, timeout=120)
    procs = [_run([r, 2, tmp_path / "init2", forced, "hutchinson"]) for r in range(2)]
    _wait(procs, timeout=120)
    run, ref = cockpit_lite.load(multi), cockpit_lite.load(forced)
    methods = [info["method"] for _, info in run.data("hess_trace")]
    assert methods == ["exact:backpack-diag-hessian", "hutchinson", "hutchinson"]
    assert "BackPACK failed in 1 of 2 processes" in run.data("hess_trace")[1][1]["exact_unavailable"]
    got, want = run.series("hess_trace")[1], ref.series("hess_trace")[1]
    for s in (1, 2):
        assert math.isclose(got[s], want[s], rel_tol=1e-5), (s, got[s], want[s])
    assert all(math.isfinite(v) for v in run.series("norm_test")[1])


def test_two_data_parallel_groups_each_reduce_within_their_own(tmp_path):
    """distributed=<a subgroup>: each group's cockpit communicator is created by its own processes
    only (torch's new_group would otherwise need every process of the job, with the same ranks)."""
    worker = os.path.join(os.path.dirname(WORKER), "ddp_subgroup_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, worker, str(r), str(tmp_path / "init")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(4)]
    outs = wait_for_processes(procs, "a subgroup worker", timeout=120)
    for rank, out in enumerate(outs):
        assert f"rank {rank} sum {2.0 if rank % 2 == 0 else 4.0}" in out, out
