"""The ``energy`` quantity in watched runs: this machine (no GPU, no readable RAPL), a fake powercap
tree, an opt-in estimate, and a fake NVML counter with coarse updates driving the GPU path."""

import math
import time

import pytest
import torch
from torch import nn

from helpers import watched_training
from cockpit_lite.energy import carbon
from cockpit_lite.energy.nvml import NvmlUnavailable, nvml_energy_counter
from cockpit_lite.energy.rapl import RaplReader
from cockpit_lite.quantities.energy import Energy

from energy_fakes import FakeEvent, FakeNvml
from test_energy_rapl import MAX_UJ, make_zone, package_adding, set_uj


def train(cockpit_kwargs, logdir, steps=5, before_step=None, sleep_s=0.0, device="cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 4, device=device), torch.randint(0, 3, (16,), device=device)
    return watched_training(model, opt, loss_fn, [(x, y)] * steps, logdir, before_step=before_step,
                            after_backward=(lambda _step: time.sleep(sleep_s)) if sleep_s else None,
                            **cockpit_kwargs).run


def test_this_machine_reports_unavailable_with_the_reason(logdir):
    run = train({"quantities": ["loss", "time", "energy"]}, logdir, steps=4)
    steps, total = run.series("energy")
    assert list(steps) == [0, 1, 2, 3]
    assert "energy/gpu0" not in run.keys() and "time/device" not in run.keys()  # no GPU: absent
    provenance = dict(run.data("energy"))
    if RaplReader().available:  # a machine with readable counters measures the CPU instead
        assert all(math.isfinite(v) and v >= 0 for v in total)
        assert all(p["cpu0"]["status"] == "measured" for p in provenance.values())
        return
    assert all(math.isnan(v) for v in total)
    for key in ("energy", "energy/cpu", "energy/kwh", "energy/co2_g"):
        reasons = run.reasons(key)
        assert sorted(reasons) == [0, 1, 2, 3]
        assert all(r.startswith("unavailable:") and ("powercap" in r or "RAPL" in r) for r in reasons.values())
    for p in provenance.values():
        assert p["cpu"]["status"] == "unavailable" and p["cpu"]["source"] == "rapl" and p["cpu"]["reason"]
        assert p["total"]["label"] == "unavailable" and p["total"]["missing"] == ["cpu"]
        assert p["carbon_intensity_g_per_kwh"] == carbon.DEFAULT_CARBON_INTENSITY_G_PER_KWH
    assert "estimate" not in str(provenance)  # no estimate unless asked for


def test_fake_powercap_tree_is_measured_per_step_with_wraparound(tmp_path, logdir):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", MAX_UJ - 3_000_000)
    make_zone(root, "intel-rapl:0:1", "dram", 100)
    increments = [1_000_000, 1_500_000, 2_000_000, 250_000, 4_000_000]  # uJ; the third step wraps
    state = {"pkg": MAX_UJ - 3_000_000, "dram": 100}

    def before_step(step):
        state["pkg"] = (state["pkg"] + increments[step]) % MAX_UJ
        state["dram"] += increments[step] // 10
        set_uj(root, "intel-rapl:0", state["pkg"])
        set_uj(root, "intel-rapl:0:1", state["dram"])

    energy = Energy(powercap_root=root, carbon_intensity_g_per_kwh=100.0)
    run = train({"quantities": ["loss", energy]}, logdir, steps=5, before_step=before_step)
    _, pkg = run.series("energy/cpu0")
    _, dram = run.series("energy/cpu0_dram")
    _, total = run.series("energy")
    _, co2 = run.series("energy/co2_g")
    assert list(pkg) == pytest.approx([i * 1e-6 for i in increments])
    assert list(dram) == pytest.approx([i // 10 * 1e-6 for i in increments])
    assert list(total) == pytest.approx(list(pkg + dram))
    assert list(co2) == pytest.approx([t / 3.6e6 * 100.0 for t in total])
    for _, p in run.data("energy"):
        assert p["cpu0"]["status"] == "measured" and p["cpu0"]["source"].startswith("rapl:intel-rapl:0")
        assert 2 * 61e-6 <= p["cpu0"]["error_j"] < math.inf  # RAPL lag (1 ms of the step's power) + resolution
        assert p["total"]["label"] == "measured" and p["total"]["missing"] == [] and p["steps"] == 1
        assert p["carbon_intensity_g_per_kwh"] == 100.0 and p["carbon_source"] == "stated by the user"


def test_sparse_schedule_records_cover_several_steps(tmp_path, logdir):
    root = tmp_path / "powercap"
    before_step = package_adding(root, 1_000_000)
    run = train({"quantities": [Energy("every:3", powercap_root=root)]}, logdir, steps=7, before_step=before_step)
    steps, pkg = run.series("energy/cpu0")
    assert list(steps) == [0, 3, 6]
    assert list(pkg) == pytest.approx([1.0, 3.0, 3.0])  # since the previous record: no step lost
    assert [p["steps"] for _, p in run.data("energy")] == [1, 3, 3]


def test_estimate_only_when_asked_and_labelled(tmp_path, logdir):
    energy = Energy(estimate={"tdp_w": 65, "cpus": 2}, powercap_root=tmp_path / "absent")
    run = train({"quantities": [energy]}, logdir, steps=3, sleep_s=0.01)
    _, cpu = run.series("energy/cpu")
    for (_, p), j in zip(run.data("energy"), cpu):
        assert p["cpu"]["status"] == "estimated" and p["cpu"]["source"] == "estimate"
        model = p["cpu"]["model"]
        assert model["name"] == "tdp_x_utilisation" and model["tdp_w"] == 65 and model["cpus"] == 2
        assert 0.0 <= model["utilisation"] <= 1.0
        assert "RAPL unavailable" in p["cpu"]["reason"]
        assert p["cpu"]["error_j"] == "NaN"  # an estimate has no error bound (stored as the JSON string NaN)
        assert p["total"]["label"] == "estimated"
        assert 0.0 <= j <= 65 * 5.0  # a step here takes well under 5 s
    assert run.header["quantities"]["energy"]["estimate"]["tdp_w"] == 65
    with pytest.raises(ValueError, match="tdp_w"):
        Energy(estimate={"watts": 65})
    with pytest.raises(ValueError, match="carbon intensity"):
        Energy(carbon_intensity_g_per_kwh=-1)


# -- the GPU path, driven by a fake NVML counter and fake CUDA events -----------------------------
def gpu_energy(nvml, **kwargs):
    FakeEvent.completions = []
    return Energy(nvml_counter=nvml.open, make_event=lambda i: FakeEvent(), poll_s=0.002, **kwargs)


def test_fake_gpu_counter_per_step_values_sum_to_the_window_totals(tmp_path, logdir):
    nvml = FakeNvml()
    energy = gpu_energy(nvml, rel_error=0.1, powercap_root=tmp_path / "absent")
    run = train({"quantities": ["loss", energy]}, logdir, steps=60, sleep_s=0.005)
    steps, gpu = run.series("energy/gpu0")
    assert list(steps) == list(range(60)) and all(math.isfinite(v) and v >= 0 for v in gpu)
    _, total = run.series("energy")
    assert list(total) == pytest.approx(list(gpu))  # the CPU is unavailable: it adds nothing
    provenance = dict(run.data("energy"))
    windows = {}
    for step, p in provenance.items():
        g = p["gpu0"]
        assert g["status"] == "measured" and g["source"] == "fake-nvml"
        assert p["total"]["missing"] == ["cpu"] and p["cpu"]["status"] == "unavailable"
        windows.setdefault(tuple(g["window"]["window"]), g["window"])
    sums = {w: math.fsum(gpu[w[0]:w[1] + 1]) for w in windows}
    for w, info in windows.items():
        assert sums[w] == pytest.approx(info["window_j"], rel=1e-9)
    closed_early = [info for w, info in sorted(windows.items())][:-1]
    assert all(info["target_met"] and info["window_error_j"] <= 0.1 * info["window_j"] for info in closed_early)
    # against the truth: constant power between the start event and the last step's event
    done = FakeEvent.completions
    true_total = nvml.watts * (done[-1] - done[0])
    bound = sum(info["window_error_j"] for info in windows.values())
    assert abs(math.fsum(gpu) - true_total) <= bound + nvml.watts * 0.004  # + poll timing of the truth itself


def test_fake_gpu_counter_that_fails_is_never_reported_as_measured(tmp_path, logdir):
    nvml = FakeNvml(fail_after_s=0.15)
    energy = gpu_energy(nvml, powercap_root=tmp_path / "absent")
    run = train({"quantities": [energy]}, logdir, steps=50, sleep_s=0.005)  # no exception reaches the loop
    steps, gpu = run.series("energy/gpu0")
    assert list(steps) == list(range(50))
    provenance = dict(run.data("energy"))
    reasons = run.reasons("energy/gpu0")
    assert reasons, "steps after the failure must be unavailable"
    for step, p in provenance.items():
        if math.isnan(gpu[step]):
            assert p["gpu0"]["status"] == "unavailable"
            assert "GPU is lost" in reasons[step] or "did not update" in reasons[step]
        else:
            assert p["gpu0"]["status"] == "measured" and math.isfinite(p["gpu0"]["error_j"])


def test_counter_that_stops_updating_leaves_the_last_steps_unavailable(tmp_path, logdir):
    nvml = FakeNvml(freeze_after_s=0.12)
    energy = gpu_energy(nvml, powercap_root=tmp_path / "absent")
    run = train({"quantities": [energy]}, logdir, steps=40, sleep_s=0.005)
    steps, gpu = run.series("energy/gpu0")
    assert list(steps) == list(range(40))
    assert math.isnan(gpu[-1])
    assert "did not update" in run.reasons("energy/gpu0")[39]
    assert math.isnan(run.series("energy")[1][-1])  # nothing measured on that step at all


def test_missing_nvidia_ml_py_is_unavailable_with_the_reason():
    try:
        import pynvml  # noqa: F401
    except ImportError:
        with pytest.raises(NvmlUnavailable, match="nvidia-ml-py"):
            nvml_energy_counter(0)
    else:
        pytest.skip("nvidia-ml-py is installed here")


def test_missing_nvml_in_a_watched_run(tmp_path, logdir):
    """A (fake) CUDA device whose counter cannot be opened: unavailable with the reason, run intact."""

    def no_nvml(index):
        raise NvmlUnavailable("the optional package nvidia-ml-py is not installed (pip install nvidia-ml-py)")

    energy = Energy(nvml_counter=no_nvml, make_event=lambda i: FakeEvent(), powercap_root=tmp_path / "absent")
    run = train({"quantities": ["loss", energy]}, logdir, steps=3)
    reasons = run.reasons("energy/gpu0")
    assert sorted(reasons) == [0, 1, 2] and all("nvidia-ml-py" in r for r in reasons.values())
    assert len(run.series("loss")[0]) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_gpu_run_reports_energy_and_device_time(logdir):
    run = train({"quantities": ["loss", "time", Energy()]}, logdir, steps=30, device="cuda")
    steps, dev = run.series("time/device")
    assert list(steps) == list(range(30)) and all(v > 0 for v in dev)
    steps, gpu = run.series("energy/gpu0")
    assert list(steps) == list(range(30))
    for step, p in run.data("energy"):
        status = p["gpu0"]["status"]
        assert status in ("measured", "unavailable")
        if status == "unavailable":
            assert p["gpu0"]["reason"] and math.isnan(gpu[step])
