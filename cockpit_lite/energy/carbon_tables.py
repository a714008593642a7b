"""Carbon intensity of a country, region or cloud region, read from CodeCarbon's bundled offline tables.

``Energy(carbon=...)`` takes one of:

* ``{"country": "FRA"}``: ISO 3166 alpha-3 code or English name; ``carbon_intensity`` (gCO2eq/kWh) of
  ``private_infra/global_energy_mix.json`` (Our World in Data / Ember, the year each entry states);
* ``{"country": "USA", "region": "california"}`` (state name or 2-letter code; EPA eGRID, lbs/MWh
  converted with 1 lb = 453.59237 g), ``{"country": "CHN", "region": "beijing"}`` (province name or
  code such as ``CN-BJ``; MEE, CO2 only), ``{"country": "SWE" | "NOR" | "FIN", "region": "SE3"}``
  (bidding zone; ENTSO-E derived);
* ``{"cloud": "gcp", "region": "europe-west1"}``: ``cloud/impact.csv`` (the provider's published figure).

The table, its year and the entry used are written to the log as ``carbon_source``. An unknown name is
a ValueError listing close matches; codecarbon not installed is a :class:`CodeCarbonMissing` naming the
extra to install. Nothing falls back to another number.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
from typing import Any, Dict, Iterable, Mapping, Tuple

from .codecarbon_data import label, table

COUNTRIES = "private_infra/global_energy_mix.json"
USA = "private_infra/2023/usa_emissions.json"
CHINA = "private_infra/2023/china_provincial_emissions.json"
NORDIC = "private_infra/nordic_emissions.json"
CLOUD = "cloud/impact.csv"
G_PER_LB = 453.59237  # lbs/MWh -> g/kWh: x 453.59237 g/lb / 1000 kWh/MWh
NORDIC_PREFIX = {"SWE": "SE", "NOR": "NO", "FIN": "FI"}
REGION_TABLES = ("USA", "CHN", "SWE", "NOR", "FIN")
KEYS = {"country", "region", "cloud"}


def _load_json(relative: str, purpose: str) -> Any:
    with open(table(purpose, relative), encoding="utf-8") as f:
        return json.load(f)


def _unknown(what: str, given: str, names: Iterable[str]) -> ValueError:
    names = sorted(set(names))
    close = difflib.get_close_matches(given.lower(), [n.lower() for n in names], n=5, cutoff=0.6)
    originals = [n for n in names if n.lower() in close]
    hint = f"; close matches: {', '.join(originals)}" if originals else f"; known: {', '.join(names[:40])}" + (
        " ..." if len(names) > 40 else "")
    return ValueError(f"unknown {what} {given!r} in CodeCarbon's table{hint}")


def _number(value: Any, where: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{where}: the table's value {value!r} is not a carbon intensity")
    return float(value)


def country_intensity(country: str, purpose: str) -> Tuple[float, str]:
    mix = _load_json(COUNTRIES, purpose)
    key = country.strip()
    entry = mix.get(key.upper())
    if entry is None:
        by_name = {str(v.get("country_name", "")).lower(): v for v in mix.values()}
        entry = by_name.get(key.lower())
    if entry is None:
        raise _unknown("country", key, list(mix) + [str(v.get("country_name", "")) for v in mix.values()])
    iso = entry.get("iso_code", key.upper())
    value = _number(entry.get("carbon_intensity"), f"{COUNTRIES} {iso}")
    return value, (f"{label(COUNTRIES)}: {entry.get('country_name', iso)} ({iso}), year {entry.get('year')}, "
                   "carbon_intensity (gCO2eq/kWh)")


def _usa(region: str, purpose: str) -> Tuple[float, str]:
    loaded = _load_json(USA, purpose)
    states = {k: v for k, v in loaded.items() if not k.startswith("_")}
    meta = loaded.get("_source", {})
    name = region.strip().lower()
    by_code = {str(v.get("regionCode", "")).lower(): k for k, v in states.items()}
    key = name if name in states else by_code.get(name)
    if key is None:
        raise _unknown("US state", region, list(states) + [str(v.get("regionCode", "")) for v in states.values()])
    lbs = _number(states[key].get("emissions"), f"{USA} {key}")
    source = (f"{label(USA)}: {key} ({states[key].get('regionCode')}), {meta.get('name', 'EPA eGRID')}, year "
              f"{meta.get('year')}; {lbs} lbs/MWh x {G_PER_LB} g/lb / 1000")
    return lbs * G_PER_LB / 1000.0, source


def _china(region: str, purpose: str) -> Tuple[float, str]:
    provinces = _load_json(CHINA, purpose)["data"]
    name = region.strip().lower()
    for suffix in (" province", " municipality", " autonomous region"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    key = None
    for code, entry in provinces.items():
        names = {code.lower(), str(entry.get("description", "")).lower()} | {str(n).lower() for n in entry.get("names", [])}
        if name in names:
            key = code
            break
    if key is None:
        raise _unknown("Chinese province", region,
                       list(provinces) + [str(e.get("description", "")) for e in provinces.values()])
    entry = provinces[key]
    value = _number(entry.get("emission_factor"), f"{CHINA} {key}")
    return value, (f"{label(CHINA)}: {entry.get('description', key)} ({key}), year {entry.get('year')}, "
                   f"emission_factor ({entry.get('unit', 'gCO2/kWh')}; CO2 only)")


def _nordic(country: str, region: str, purpose: str) -> Tuple[float, str]:
    zones = {k: v for k, v in _load_json(NORDIC, purpose)["data"].items() if k.startswith(NORDIC_PREFIX[country])}
    key = region.strip().upper()
    if key not in zones:
        raise _unknown(f"{country} bidding zone", region, zones)
    entry = zones[key]
    value = _number(entry.get("emission_factor"), f"{NORDIC} {key}")
    return value, (f"{label(NORDIC)}: {entry.get('description', key)} ({key}), year {entry.get('year')}, "
                   f"emission_factor ({entry.get('unit', 'gCO2eq/kWh')})")


def region_intensity(country: str, region: str, purpose: str) -> Tuple[float, str]:
    mix = _load_json(COUNTRIES, purpose)
    iso = country.strip().upper()
    if iso not in mix:  # a country name: its code
        by_name = {str(v.get("country_name", "")).lower(): k for k, v in mix.items()}
        iso = by_name.get(country.strip().lower(), iso)
    if iso == "USA":
        return _usa(region, purpose)
    if iso == "CHN":
        return _china(region, purpose)
    if iso in NORDIC_PREFIX:
        return _nordic(iso, region, purpose)
    raise ValueError(f"CodeCarbon has no regional carbon-intensity table for country {country!r}; regions are "
                     f"known for {', '.join(REGION_TABLES)}; pass {{'country': {country!r}}} alone for the "
                     "national value, or a number as carbon_intensity_g_per_kwh")


def cloud_intensity(provider: str, region: str, purpose: str) -> Tuple[float, str]:
    with open(table(purpose, CLOUD), encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    providers = sorted({r["provider"] for r in rows})
    if provider.strip().lower() not in {p.lower() for p in providers}:
        raise _unknown("cloud provider", provider, providers)
    mine = [r for r in rows if r["provider"].lower() == provider.strip().lower()]
    match = [r for r in mine if r["region"].lower() == region.strip().lower()]
    if not match:
        raise _unknown(f"{provider} region", region, [r["region"] for r in mine])
    row = match[0]
    value = _number(float(row["impact"]), f"{CLOUD} {row['provider']} {row['region']}")
    place = ", ".join(x for x in (row.get("city", ""), row.get("country_name", "")) if x)
    return value, f"{label(CLOUD)}: {row['provider']} {row['region']} ({place}), impact (gCO2eq/kWh) from {row.get('source', '')}"


def intensity_from_tables(spec: Mapping[str, Any]) -> Tuple[float, str]:
    """``(gCO2eq per kWh, carbon_source)`` for ``Energy(carbon=spec)``."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"carbon must be a dict such as {{'country': 'FRA'}}, got {spec!r}")
    unknown = set(spec) - KEYS
    if unknown:
        raise ValueError(f"unknown carbon keys {sorted(unknown)}; known: country, region, cloud")
    values: Dict[str, str] = {}
    for k, v in spec.items():
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"carbon[{k!r}] must be a non-empty string, got {v!r}")
        values[k] = v
    purpose = f"carbon={dict(spec)!r}"
    if "cloud" in values:
        if "country" in values or "region" not in values:
            raise ValueError("carbon={'cloud': ..., 'region': ...} takes the provider and its region, no country")
        return cloud_intensity(values["cloud"], values["region"], purpose)
    if "country" not in values:
        raise ValueError("carbon needs 'country' (ISO alpha-3 code or name), optionally 'region', or 'cloud' and 'region'")
    if "region" in values:
        return region_intensity(values["country"], values["region"], purpose)
    return country_intensity(values["country"], purpose)


__all__ = ["intensity_from_tables", "country_intensity", "region_intensity", "cloud_intensity"]
