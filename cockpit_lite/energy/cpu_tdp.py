"""The CPU's thermal design power from CodeCarbon's CPU power table (``hardware/cpu_power.csv``).

For ``Energy(estimate={"tdp_w": "auto"})``: the model name (``/proc/cpuinfo`` "model name", or the
``cpu_model`` the user gives) is matched against the table's ``Name`` column after the same
normalisation on both sides (lower case; ``(R)``, ``(TM)``, "CPU", "Processor", "(OEM Only)" and the
``@ 2.50GHz`` clock removed). A match is the table name itself, or the table name followed only by a
core count ("16-Core") and/or integrated graphics ("with Radeon Graphics"); never a neighbouring model
(``6248`` is not ``6248R``, ``E5-2686`` is not ``E5-2686 v4``). No match, or matches with different TDPs,
or a malformed TDP cell, is :class:`TdpNotFound` with a reason naming the model: the estimate is then unavailable, never guessed.
The TDP is per package; the number of packages is the count of distinct "physical id" in cpuinfo.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from .codecarbon_data import label, table

CPU_TABLE = "hardware/cpu_power.csv"
CPUINFO = "/proc/cpuinfo"
_TRADEMARKS = re.compile(r"\((r|tm)\)|®|™", re.I)
_NOISE = re.compile(r"@.*$|\(oem only\)|\bcpu\b|\bprocessor\b", re.I)
_SUFFIX = re.compile(r"^(\d+-core)?\s*((with|w/)\s+radeon.*)?$")


class TdpNotFound(LookupError):
    """The CPU model is not (unambiguously) in the table."""


@dataclass(frozen=True)
class TdpMatch:
    tdp_w: float  # per package
    table_name: str
    cpu_model: str
    source: str


def normalise(name: str) -> str:
    return " ".join(_NOISE.sub(" ", _TRADEMARKS.sub(" ", name)).lower().split())


def read_cpuinfo(path: Optional[str] = None) -> Tuple[Optional[str], int]:
    """``(model name or None, number of packages >= 1)`` from a cpuinfo file (``/proc/cpuinfo``)."""
    model, packages = None, set()
    try:
        with open(path or CPUINFO, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "physical id":
                    packages.add(value.strip())
    except OSError:
        pass
    return model, max(len(packages), 1)


def _load() -> Dict[str, List[Tuple[str, float]]]:
    """normalised name -> [(table name, TDP)]"""
    out: Dict[str, List[Tuple[str, float]]] = {}
    with open(table("estimate={'tdp_w': 'auto'}", CPU_TABLE), encoding="utf-8-sig", newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("Name"):
                continue
            try:
                tdp = float(row["TDP"])
            except (KeyError, TypeError, ValueError):
                tdp = math.nan  # a malformed cell ("27.29.5"): kept, so that a match on it is reported
            out.setdefault(normalise(row["Name"]), []).append((row["Name"], tdp if tdp > 0 else math.nan))
    return out


def lookup_tdp(cpu_model: Optional[str]) -> TdpMatch:
    """The table's TDP for ``cpu_model``; :class:`TdpNotFound` (naming the model) when there is none."""
    if not cpu_model or not cpu_model.strip():
        raise TdpNotFound("the CPU model name is unknown (no 'model name' in /proc/cpuinfo); pass "
                          "estimate={'tdp_w': W} or {'tdp_w': 'auto', 'cpu_model': '...'}")
    rows = _load()
    wanted = normalise(cpu_model)
    found = None
    for name in sorted(rows, key=len, reverse=True):  # the longest table name that matches
        if not re.search(r"\d", name.split()[-1] if name else ""):
            continue  # a family name without a model number ("intel xeon") identifies nothing
        if wanted == name or (wanted.startswith(name + " ") and _SUFFIX.match(wanted[len(name) + 1:])):
            found = name
            break
    if found is None:
        raise TdpNotFound(f"CPU model {cpu_model!r} is not in CodeCarbon's CPU power table ({label(CPU_TABLE)}); "
                          "pass the TDP as estimate={'tdp_w': W}")
    names = [n for n, _ in rows[found]]
    if any(math.isnan(tdp) for _, tdp in rows[found]):
        raise TdpNotFound(f"CPU model {cpu_model!r} matches {names} in {label(CPU_TABLE)}, whose TDP cell is not "
                          "a number of watts; pass the TDP as estimate={'tdp_w': W}")
    tdps = sorted({tdp for _, tdp in rows[found]})
    if len(tdps) > 1:
        raise TdpNotFound(f"CPU model {cpu_model!r} matches {names} in {label(CPU_TABLE)} with different TDPs "
                          f"{tdps} W; pass the TDP as estimate={{'tdp_w': W}}")
    return TdpMatch(tdps[0], names[0], cpu_model, f"{label(CPU_TABLE)}: {names[0]!r} = {tdps[0]:g} W per package")


__all__ = ["TdpMatch", "TdpNotFound", "lookup_tdp", "read_cpuinfo", "normalise", "CPU_TABLE"]
