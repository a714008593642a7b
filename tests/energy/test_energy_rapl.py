"""RAPL powercap reading on a fake /sys/class/powercap tree in a temporary directory."""

import math
from pathlib import Path

import pytest

from cockpit_lite.energy.rapl import (RaplReader, RaplUnavailable, counter_delta_uj, discover_domains,
                                      rapl_error_bound_j)

MAX_UJ = 262143328850


def make_zone(root: Path, zone: str, name: str, energy_uj: int, max_uj: int = MAX_UJ) -> Path:
    d = root / zone
    d.mkdir(parents=True)
    (d / "name").write_text(name + "\n")
    (d / "energy_uj").write_text(f"{energy_uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


@pytest.fixture
def powercap(tmp_path):
    root = tmp_path / "powercap"
    make_zone(root, "intel-rapl:0", "package-0", 1_000_000)
    make_zone(root, "intel-rapl:0:0", "core", 500_000)  # part of the package: not added
    make_zone(root, "intel-rapl:0:1", "dram", 2_000_000, max_uj=65532610987)
    make_zone(root, "intel-rapl:1", "psys", 9_000_000)  # contains the package: not added
    make_zone(root, "intel-rapl-mmio:0", "package-0", 1)  # duplicate interface: not added
    (root / "dtpm").mkdir()  # unrelated powercap entries are ignored
    return root


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / zone / "energy_uj").write_text(f"{value}\n")


def package_adding(root: Path, uj_per_step: int):
    """A package zone ``intel-rapl:0`` at 0 uJ, and a ``before_step(step)`` that adds ``uj_per_step`` to it."""
    make_zone(root, "intel-rapl:0", "package-0", 0)
    state = {"uj": 0}

    def before_step(step):
        state["uj"] += uj_per_step
        set_uj(root, "intel-rapl:0", state["uj"])

    return before_step


def test_discovers_package_and_dram_only(powercap):
    domains = discover_domains(powercap)
    assert [(d.device, d.name, d.zone) for d in domains] == [
        ("cpu0", "package-0", "intel-rapl:0"), ("cpu0_dram", "dram", "intel-rapl:0:1")]
    assert domains[1].max_range_uj == 65532610987


def test_reads_deltas_and_handles_wraparound(powercap):
    reader = RaplReader(powercap)
    assert reader.available and reader.devices == ["cpu0", "cpu0_dram"]
    before = reader.read_uj()
    set_uj(powercap, "intel-rapl:0", 3_500_000)  # +2.5 J
    set_uj(powercap, "intel-rapl:0:1", 2_250_000)  # +0.25 J
    after = reader.read_uj()
    assert reader.delta_j(before, after) == pytest.approx({"cpu0": 2.5, "cpu0_dram": 0.25})
    # the package counter wraps: MAX - 1 J -> 0.5 J is 1.5 J, not a negative value
    set_uj(powercap, "intel-rapl:0", MAX_UJ - 1_000_000)
    near_max = reader.read_uj()
    set_uj(powercap, "intel-rapl:0", 500_000)
    wrapped = reader.read_uj()
    assert reader.delta_j(near_max, wrapped)["cpu0"] == pytest.approx(1.5)
    assert counter_delta_uj(10, 10, 100) == 0
    assert counter_delta_uj(90, 5, 100) == 15


def test_unreadable_counter_is_unavailable_with_the_reason(powercap, monkeypatch):
    # tests may run as root, where chmod 000 does not stop reads: make the read itself fail as it does
    # for a normal user since Linux 5.10
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    reader = RaplReader(powercap)
    assert not reader.available and reader.devices == []
    assert "not readable" in reader.reason and "Linux 5.10" in reader.reason


def test_garbage_or_missing_files_are_unavailable(tmp_path):
    reader = RaplReader(tmp_path / "nowhere")
    assert not reader.available and "no powercap interface" in reader.reason
    root = tmp_path / "pc"
    d = make_zone(root, "intel-rapl:0", "package-0", 0)
    (d / "energy_uj").write_text("not a number\n")
    reader = RaplReader(root)
    assert not reader.available and "cannot read" in reader.reason
    (root / "intel-rapl:0" / "max_energy_range_uj").unlink()
    with pytest.raises(RaplUnavailable, match="max_energy_range_uj"):
        discover_domains(root)
    # a root with only a psys zone has nothing this reader may add
    root2 = tmp_path / "pc2"
    make_zone(root2, "intel-rapl:1", "psys", 0)
    assert "no readable RAPL package/dram zone" in RaplReader(root2).reason


def test_error_bound_scales_with_power():
    assert rapl_error_bound_j(10.0, 0.1) == pytest.approx(2 * (100.0 * 1e-3 + 61e-6))
    assert rapl_error_bound_j(0.0, 0.0) == pytest.approx(2 * 61e-6)
    assert math.isfinite(rapl_error_bound_j(1.0, 1e-9))
