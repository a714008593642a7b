"""Opt-in energy *estimates*, for devices whose counters cannot be read.

Only built when the user asks (``Energy(estimate={"tdp_w": 65})``); every value it produces is
labelled ``estimated`` and carries this model and its parameters. Model ``tdp_x_utilisation``:

    E = tdp_w * utilisation * wall_s,   utilisation = process CPU seconds / (wall_s * cpus)

i.e. the processor's thermal design power scaled by the share of its logical CPUs this process
kept busy (``time.process_time`` counts every thread of the process). Idle power, other processes,
DRAM and turbo above TDP are ignored, so the estimate has no error bound.

``{"tdp_w": "auto"}`` takes the TDP from CodeCarbon's CPU power table for this CPU's model name
(``cpu_tdp.py``; ``"cpu_model"`` overrides /proc/cpuinfo), times the number of packages. A model not in
the table gives an :class:`UnavailableEstimate` whose reason names the model: no number is guessed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

MODEL = "tdp_x_utilisation"


@dataclass
class TdpEstimator:
    tdp_w: float
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    tdp_source: str = "stated by the user"
    lookup: Optional[Dict[str, Any]] = None  # {"cpu_model", "table_name", "tdp_per_package_w", "packages"}
    wall_clock: Callable[[], float] = time.perf_counter
    cpu_clock: Callable[[], float] = time.process_time

    available = True

    def __post_init__(self):
        if not (isinstance(self.tdp_w, (int, float)) and math.isfinite(self.tdp_w) and self.tdp_w > 0):
            raise ValueError(f"estimate needs tdp_w > 0 (watts), got {self.tdp_w!r}")
        if int(self.cpus) < 1:
            raise ValueError(f"estimate needs cpus >= 1, got {self.cpus!r}")
        self.cpus = int(self.cpus)

    @property
    def model(self) -> Dict[str, Any]:
        out = {"name": MODEL, "tdp_w": float(self.tdp_w), "cpus": self.cpus, "tdp_source": self.tdp_source,
               "formula": "tdp_w * process_cpu_s / (wall_s * cpus) * wall_s"}
        if self.lookup is not None:
            out.update(self.lookup)
        return out

    def read(self) -> Tuple[float, float]:
        return self.wall_clock(), self.cpu_clock()

    def joules(self, before: Tuple[float, float], after: Tuple[float, float]) -> Tuple[float, float]:
        """``(joules, utilisation)`` between two ``read()`` results."""
        wall = max(after[0] - before[0], 0.0)
        cpu = max(after[1] - before[1], 0.0)
        if wall <= 0:
            return 0.0, 0.0
        utilisation = min(cpu / (wall * self.cpus), 1.0)
        return self.tdp_w * utilisation * wall, utilisation


@dataclass
class UnavailableEstimate:
    """An estimate was asked for with ``tdp_w="auto"`` but the TDP could not be looked up."""

    reason: str
    cpu_model: Optional[str] = None
    available = False

    @property
    def model(self) -> Dict[str, Any]:
        return {"name": MODEL, "tdp_w": "auto", "cpu_model": self.cpu_model, "unavailable": self.reason}


def _auto(spec: Mapping[str, Any], kwargs: Dict[str, Any]):
    from .cpu_tdp import TdpNotFound, lookup_tdp, read_cpuinfo

    model, packages = read_cpuinfo()
    model = spec.get("cpu_model") or model
    try:
        match = lookup_tdp(model)  # CodeCarbonMissing (an ImportError naming the extra) propagates
    except TdpNotFound as err:
        return UnavailableEstimate(str(err), model)
    lookup = {"cpu_model": match.cpu_model, "table_name": match.table_name, "tdp_per_package_w": match.tdp_w,
              "packages": packages}
    return TdpEstimator(tdp_w=match.tdp_w * packages, tdp_source=match.source, lookup=lookup, **kwargs)


def make_estimator(spec: Optional[Mapping[str, Any]]) -> Union[None, TdpEstimator, UnavailableEstimate]:
    """``None`` (no estimate) unless the user gave ``{"tdp_w": W | "auto", "cpus": N (optional),
    "cpu_model": "..." (optional, with "auto")}``."""
    if spec is None or spec is False:
        return None
    if not isinstance(spec, Mapping):
        raise TypeError(f"estimate must be a dict such as {{'tdp_w': 65}}, got {spec!r}")
    unknown = set(spec) - {"tdp_w", "cpus", "cpu_model"}
    if unknown:
        raise ValueError(f"unknown estimate parameters {sorted(unknown)}; known: tdp_w, cpus, cpu_model")
    if "tdp_w" not in spec:
        raise ValueError("estimate needs tdp_w, the CPU's thermal design power in watts, e.g. {'tdp_w': 65}, "
                         "or 'auto' to look it up in CodeCarbon's CPU table")
    if "cpu_model" in spec and spec["tdp_w"] != "auto":
        raise ValueError("estimate's cpu_model is used only with tdp_w='auto'")
    kwargs: Dict[str, Any] = {}
    if "cpus" in spec:
        kwargs["cpus"] = spec["cpus"]
    if spec["tdp_w"] == "auto":
        return _auto(spec, kwargs)
    return TdpEstimator(tdp_w=spec["tdp_w"], **kwargs)


__all__ = ["TdpEstimator", "UnavailableEstimate", "make_estimator", "MODEL"]
