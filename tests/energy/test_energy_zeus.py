"""Zeus as the GPU counter where NVML cannot be used. Without a GPU this checks our plumbing only,
with a fake object that has the methods of ``zeus.device.get_gpus()`` (mJ counters): fallback order,
unit conversion, reasons, and the values of a watched run. It does not test Zeus itself."""

import math

import pytest

from cockpit_lite.energy import zeus_counter
from cockpit_lite.energy.nvml import NvmlUnavailable
from cockpit_lite.quantities.energy import Energy

from energy_fakes import FakeEvent, FakeNvml


class FakeZeusGpus:
    """The subset of Zeus's ``GPUs`` we call; the counter is a FakeNvml (J) reported in integer mJ."""

    def __init__(self, counter=None, supported=True):
        self.counter, self.supported, self.calls = counter or FakeNvml(), supported, []

    def supports_get_total_energy_consumption(self, index):
        return self.supported

    def get_total_energy_consumption(self, index):
        self.calls.append(index)
        return int(round(self.counter() * 1000))

    def get_name(self, index):
        return "Fake MI300X"


def no_nvml(index):
    raise NvmlUnavailable("NVML could not be initialised: driver not loaded")


def test_zeus_not_installed_changes_nothing(monkeypatch):
    monkeypatch.setattr(zeus_counter, "nvml_energy_counter", no_nvml)

    def missing():
        raise zeus_counter.ZeusNotInstalled("No module named 'zeus'")

    monkeypatch.setattr(zeus_counter, "_zeus_get_gpus", missing)
    with pytest.raises(NvmlUnavailable) as err:
        zeus_counter.gpu_energy_counter(0)
    assert str(err.value) == "NVML could not be initialised: driver not loaded"  # NVML's reason, unchanged


def test_nvml_first_then_zeus_with_both_reasons(monkeypatch):
    monkeypatch.setattr(zeus_counter, "nvml_energy_counter", lambda i: (lambda: 1.0, "nvml:x"))
    monkeypatch.setattr(zeus_counter, "_zeus_get_gpus", lambda: pytest.fail("Zeus used although NVML works"))
    assert zeus_counter.gpu_energy_counter(0)[1] == "nvml:x"

    monkeypatch.setattr(zeus_counter, "nvml_energy_counter", no_nvml)
    gpus = FakeZeusGpus(supported=False)
    monkeypatch.setattr(zeus_counter, "_zeus_get_gpus", lambda: (lambda: gpus))
    with pytest.raises(NvmlUnavailable, match="driver not loaded; Zeus: cuda:1 has no total energy counter"):
        zeus_counter.gpu_energy_counter(1)

    def init_fails():
        raise RuntimeError("NVML and AMDSMI unavailable")

    monkeypatch.setattr(zeus_counter, "_zeus_get_gpus", lambda: init_fails)
    with pytest.raises(NvmlUnavailable, match="Zeus cannot read .*RuntimeError: NVML and AMDSMI unavailable"):
        zeus_counter.gpu_energy_counter(0)


def test_zeus_counter_reads_joules_of_the_right_device():
    gpus = FakeZeusGpus()
    read, label = zeus_counter.zeus_energy_counter(3, lambda: gpus)
    assert label == "zeus:Fake MI300X"
    mj = gpus.get_total_energy_consumption(3)
    assert read() == pytest.approx(mj * 1e-3, abs=gpus.counter.watts * gpus.counter.period + 1e-3)
    assert set(gpus.calls) == {3}


def test_watched_run_measures_through_zeus(monkeypatch, tmp_path, logdir):
    from test_energy_quantity import train

    gpus = FakeZeusGpus()
    monkeypatch.setattr(zeus_counter, "nvml_energy_counter", no_nvml)
    monkeypatch.setattr(zeus_counter, "_zeus_get_gpus", lambda: (lambda: gpus))
    FakeEvent.completions = []
    energy = Energy(make_event=lambda i: FakeEvent(), poll_s=0.002, rel_error=0.1, powercap_root=tmp_path / "absent")
    run = train({"quantities": ["loss", energy]}, logdir, steps=40, sleep_s=0.005)
    steps, gpu = run.series("energy/gpu0")
    assert list(steps) == list(range(40)) and all(math.isfinite(v) and v >= 0 for v in gpu)
    windows = {}
    for _, p in run.data("energy"):
        assert p["gpu0"]["status"] == "measured" and p["gpu0"]["source"] == "zeus:Fake MI300X"
        windows.setdefault(tuple(p["gpu0"]["window"]["window"]), p["gpu0"]["window"])
    for (first, last), info in windows.items():
        assert math.fsum(gpu[first:last + 1]) == pytest.approx(info["window_j"], rel=1e-9)
    done = FakeEvent.completions
    true_total = gpus.counter.watts * (done[-1] - done[0])
    bound = sum(info["window_error_j"] for info in windows.values())
    assert abs(math.fsum(gpu) - true_total) <= bound + gpus.counter.watts * 0.004
