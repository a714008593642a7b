"""Carbon intensity from CodeCarbon's bundled tables (``Energy(carbon=...)``), checked against the same
files parsed here independently; codecarbon absent -> an error naming the extra, never another number."""

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

from cockpit_lite.energy import codecarbon_data
from cockpit_lite.energy.carbon_tables import intensity_from_tables
from cockpit_lite.quantities.energy import Energy


def codecarbon_dir() -> Path:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None:
        pytest.skip("codecarbon is not installed (optional extra 'carbon')")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load(relative):
    return json.loads((codecarbon_dir() / relative).read_text(encoding="utf-8"))


@pytest.mark.parametrize("country", ["FRA", "USA", "IND", "BRA"])
def test_country_intensity_is_the_tables_value(country):
    entry = load("private_infra/global_energy_mix.json")[country]
    value, source = intensity_from_tables({"country": country})
    assert value == entry["carbon_intensity"]
    assert "global_energy_mix.json" in source and country in source and f"year {entry['year']}" in source
    by_name, _ = intensity_from_tables({"country": entry["country_name"].upper()})  # names, any case
    assert by_name == value


def test_regions_are_the_tables_values():
    usa = load("private_infra/2023/usa_emissions.json")
    for state in ("california", "texas", "vermont"):
        value, source = intensity_from_tables({"country": "USA", "region": state})
        assert value == pytest.approx(usa[state]["emissions"] * 0.45359237, rel=1e-12)  # lbs/MWh -> g/kWh
        assert state in source and "usa_emissions.json" in source
        by_code, _ = intensity_from_tables({"country": "United States", "region": usa[state]["regionCode"]})
        assert by_code == value
    china = load("private_infra/2023/china_provincial_emissions.json")["data"]
    assert intensity_from_tables({"country": "CHN", "region": "Guangdong Province"})[0] == china["CN-GD"]["emission_factor"]
    assert intensity_from_tables({"country": "CHN", "region": "cn-bj"})[0] == china["CN-BJ"]["emission_factor"]
    nordic = load("private_infra/nordic_emissions.json")["data"]
    value, source = intensity_from_tables({"country": "NOR", "region": "no4"})
    assert value == nordic["NO4"]["emission_factor"] and f"year {nordic['NO4']['year']}" in source
    with pytest.raises(ValueError, match="bidding zone"):
        intensity_from_tables({"country": "SWE", "region": "NO4"})  # a Norwegian zone is not Swedish


def test_cloud_region_is_the_tables_value():
    with open(codecarbon_dir() / "cloud/impact.csv", encoding="utf-8-sig", newline="") as f:
        rows = {(r["provider"], r["region"]): float(r["impact"]) for r in csv.DictReader(f)}
    for provider, region in list(rows)[:3]:
        value, source = intensity_from_tables({"cloud": provider.upper(), "region": region})
        assert value == rows[(provider, region)] and region in source and "impact.csv" in source


def test_unknown_names_list_close_matches():
    codecarbon_dir()
    with pytest.raises(ValueError, match="close matches: .*France"):
        intensity_from_tables({"country": "Frannce"})
    with pytest.raises(ValueError, match="close matches: california"):
        intensity_from_tables({"country": "USA", "region": "californa"})
    with pytest.raises(ValueError, match="europe-west1"):
        intensity_from_tables({"cloud": "gcp", "region": "europe-west1x"})
    with pytest.raises(ValueError, match="no regional carbon-intensity table for country 'DEU'"):
        intensity_from_tables({"country": "DEU", "region": "bavaria"})
    for bad in ({"contry": "FRA"}, {"region": "texas"}, {"cloud": "gcp"}, {"country": ""}, {"country": 3}):
        with pytest.raises(ValueError):
            intensity_from_tables(bad)


def test_without_codecarbon_the_error_names_the_extra(monkeypatch):
    monkeypatch.setattr(codecarbon_data, "_find_spec", lambda name: None)
    with pytest.raises(codecarbon_data.CodeCarbonMissing, match=r"cockpit-lite\[carbon\]") as err:
        Energy(carbon={"country": "FRA"})
    assert "carbon={'country': 'FRA'}" in str(err.value) and isinstance(err.value, ImportError)


def test_explicit_number_and_default_still_work_and_do_not_mix():
    assert Energy(carbon_intensity_g_per_kwh=100.0).describe()["carbon_source"] == "stated by the user"
    default = Energy().describe()
    assert default["carbon_intensity_g_per_kwh"] == 480.0 and "world average" in default["carbon_source"]
    with pytest.raises(ValueError, match="not both"):
        Energy(carbon={"country": "FRA"}, carbon_intensity_g_per_kwh=50.0)


def test_run_logs_the_table_entry_and_uses_it_for_co2(tmp_path, logdir):
    from test_energy_quantity import train
    from test_energy_rapl import package_adding

    entry = load("private_infra/global_energy_mix.json")["FRA"]
    root = tmp_path / "powercap"
    before_step = package_adding(root, 2_000_000)
    run = train({"quantities": [Energy(powercap_root=root, carbon={"country": "FRA"})]}, logdir, steps=3,
                before_step=before_step)
    _, co2 = run.series("energy/co2_g")
    assert list(co2) == pytest.approx([2.0 / 3.6e6 * entry["carbon_intensity"]] * 3)
    for _, p in run.data("energy"):
        assert p["carbon_intensity_g_per_kwh"] == entry["carbon_intensity"]
        assert "France (FRA)" in p["carbon_source"] and "codecarbon" in p["carbon_source"]
    assert math.isclose(run.header["quantities"]["energy"]["carbon_intensity_g_per_kwh"], entry["carbon_intensity"])
