"""``Energy(estimate={"tdp_w": "auto"})``: the CPU's TDP from CodeCarbon's CPU power table, checked against
the CSV parsed here; a model not in the table -> the estimate is unavailable naming it, never a guess."""

import csv
import importlib.util
from pathlib import Path

import pytest

from cockpit_lite.energy import codecarbon_data, cpu_tdp
from cockpit_lite.energy.cpu_tdp import TdpNotFound, lookup_tdp, read_cpuinfo
from cockpit_lite.quantities.energy import Energy


def table_tdps():
    spec = importlib.util.find_spec("codecarbon")
    if spec is None:
        pytest.skip("codecarbon is not installed (optional extra 'carbon')")
    path = Path(list(spec.submodule_search_locations)[0]) / "data/hardware/cpu_power.csv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        return {row["Name"]: row["TDP"] for row in csv.DictReader(f)}  # raw: some rows are malformed


# /proc/cpuinfo spellings -> the table row they are
CPUINFO_NAMES = {
    "Intel(R) Xeon(R) Gold 5118 CPU @ 2.30GHz": "Intel Xeon Gold 5118",
    "AMD EPYC 7763 64-Core Processor": "AMD EPYC 7763",
    "Intel(R) Core(TM) i7-8550U CPU @ 1.80GHz": "Intel Core i7-8550U",
    "AMD Ryzen 7 7840U w/ Radeon 780M Graphics": "AMD Ryzen 7 7840U",
}


@pytest.mark.parametrize("cpuinfo_name", sorted(CPUINFO_NAMES))
def test_tdp_is_the_tables_value(cpuinfo_name):
    tdps = table_tdps()
    match = lookup_tdp(cpuinfo_name)
    assert match.tdp_w == float(tdps[CPUINFO_NAMES[cpuinfo_name]])
    assert match.table_name == CPUINFO_NAMES[cpuinfo_name] and "cpu_power.csv" in match.source


@pytest.mark.parametrize("cpuinfo_name", [
    "Intel(R) Xeon(R) Processor",  # a family, no model number (this machine's virtual CPU)
    "Intel(R) Xeon(R) Gold 5118X CPU @ 2.30GHz",  # a neighbour of a listed model is not that model
    "Intel(R) Xeon(R) Gold 5118 v2 CPU @ 2.30GHz",
    "Imaginary Cores 9000",
])
def test_models_not_in_the_table_are_not_guessed(cpuinfo_name):
    tdps = table_tdps()
    assert not any(cpu_tdp.normalise(n) == cpu_tdp.normalise(cpuinfo_name) for n in tdps)
    with pytest.raises(TdpNotFound, match="CPU model " + repr(cpuinfo_name).replace("(", r"\(").replace(")", r"\)")):
        lookup_tdp(cpuinfo_name)


def test_malformed_or_conflicting_rows_are_reported_not_used():
    tdps = table_tdps()
    with pytest.raises(ValueError):
        float(tdps["Intel Celeron 1200"])  # the table's cell is not a number ("29.32.9")
    with pytest.raises(TdpNotFound, match="'Intel Celeron 1200'.*not a number"):
        lookup_tdp("Intel(R) Celeron(R) 1200")
    # two spellings of one model (one with a no-break space) with different TDPs: ambiguous
    assert {float(v) for k, v in tdps.items() if " ".join(k.split()) == "Intel Atom E625CT"} == {3.0, 2.7}
    with pytest.raises(TdpNotFound, match="different TDPs"):
        lookup_tdp("Intel(R) Atom(TM) E625CT")


def test_cpuinfo_model_and_packages(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text("".join(f"processor\t: {i}\nmodel name\t: AMD EPYC 7763 64-Core Processor\n"
                            f"physical id\t: {i % 2}\n\n" for i in range(4)))
    assert read_cpuinfo(str(path)) == ("AMD EPYC 7763 64-Core Processor", 2)
    assert read_cpuinfo(str(tmp_path / "absent")) == (None, 1)


def test_auto_estimate_in_a_run_uses_table_tdp_times_packages(tmp_path, logdir, monkeypatch):
    from test_energy_quantity import train

    tdp = float(table_tdps()["AMD EPYC 7763"])
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("model name\t: AMD EPYC 7763 64-Core Processor\nphysical id\t: 0\n\n"
                       "model name\t: AMD EPYC 7763 64-Core Processor\nphysical id\t: 1\n")
    monkeypatch.setattr(cpu_tdp, "CPUINFO", str(cpuinfo))
    energy = Energy(estimate={"tdp_w": "auto", "cpus": 2}, powercap_root=tmp_path / "absent")
    run = train({"quantities": [energy]}, logdir, steps=3, sleep_s=0.01)
    _, cpu = run.series("energy/cpu")
    for (_, p), j in zip(run.data("energy"), cpu):
        model = p["cpu"]["model"]
        assert p["cpu"]["status"] == "estimated" and p["total"]["label"] == "estimated"
        assert model["tdp_w"] == 2 * tdp and model["tdp_per_package_w"] == tdp and model["packages"] == 2
        assert "cpu_power.csv" in model["tdp_source"] and model["table_name"] == "AMD EPYC 7763"
        assert 0.0 <= j <= 2 * tdp * 5.0


def test_auto_estimate_for_an_unknown_cpu_is_unavailable_naming_it(tmp_path, logdir):
    from test_energy_quantity import train

    table_tdps()
    energy = Energy(estimate={"tdp_w": "auto", "cpu_model": "Imaginary Cores 9000"}, powercap_root=tmp_path / "absent")
    run = train({"quantities": [energy]}, logdir, steps=2)
    for _, p in run.data("energy"):
        assert p["cpu"]["status"] == "unavailable" and "'Imaginary Cores 9000'" in p["cpu"]["reason"]
        assert p["total"]["label"] == "unavailable"
    assert all("Imaginary Cores 9000" in r for r in run.reasons("energy/cpu").values())
    assert run.header["quantities"]["energy"]["estimate"]["tdp_w"] == "auto"


def test_auto_without_codecarbon_names_the_extra(monkeypatch):
    monkeypatch.setattr(codecarbon_data, "_find_spec", lambda name: None)
    with pytest.raises(codecarbon_data.CodeCarbonMissing, match=r"cockpit-lite\[carbon\]"):
        Energy(estimate={"tdp_w": "auto"})
    with pytest.raises(ValueError, match="cpu_model"):
        Energy(estimate={"tdp_w": 65, "cpu_model": "x"})
