"""``energy``: joules of each step per device, each labelled measured / estimated / unavailable.

Devices (names used in the log keys ``energy/<device>``):

* ``cpu0``, ``cpu0_dram``, ...: RAPL package / DRAM counters (whole socket, every process on it),
  read at the end of each tracked step; ``cpu`` when they cannot be read (``unavailable`` with the
  reason, or ``estimated`` if the user asked for an estimate, ``Energy(estimate={"tdp_w": 65})``);
* ``gpu0``, ...: for each CUDA device holding watched parameters, the NVML cumulative counter
  (or Zeus's, ``energy/zeus_counter.py``, where NVML cannot be used and zeus is installed) sampled by a thread, with CUDA events as step ends. Its per-step values are known only once the
  counter has updated after a window of steps long enough for the error bound (``rel_error``), so
  they are written as amendments of the earlier steps (and at ``close`` for the last window).

For GPU values, ``error_j`` is the step's share of its window's bound: the bound holds for the
window's sum (``window_j`` +- ``window_error_j`` in the device's ``window`` entry); a single step gets
the window's energy in proportion to its duration, so power changes inside a window are not resolved.

A record covers the time since the previous tracked step ended (since ``watch`` for the first):
``data["energy"]["steps"]`` says how many steps that is (more than 1 under a sparse schedule or
after skipped steps). ``energy`` is the sum over devices with a measured or estimated value,
``energy/kwh`` and ``energy/co2_g`` derive from it for the stated carbon intensity. The step's
loss is logged by ``loss``, so energy per unit of loss decrease can be computed from the log.

Data parallel: the per-step records are process 0's devices (``data["energy"]["total"]["scope"]``
says so); at ``close`` every process's run totals are gathered and combined per physical device
(a CPU socket shared by processes counted once; ``energy/processes.py``) into
``data["energy_all_processes"]`` of the last tracked step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..energy import carbon as carbon_units
from ..energy.carbon_tables import intensity_from_tables
from ..energy.attribution import StepEnergy
from ..energy.estimate import TdpEstimator, UnavailableEstimate, make_estimator
from ..energy.processes import combine, gpu_identity, host
from ..energy.rapl import POWERCAP_ROOT, RaplReader, RaplUnavailable, rapl_error_bound_j
from .base import Quantity

MEASURED, ESTIMATED, UNAVAILABLE = "measured", "estimated", "unavailable"


@dataclass
class DeviceEnergy:
    status: str
    source: str
    joules: float = math.nan
    error_j: float = math.nan
    reason: str = ""
    model: Optional[Dict[str, Any]] = None
    window: Optional[Dict[str, Any]] = None

    def provenance(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"status": self.status, "source": self.source, "error_j": self.error_j}
        if self.reason:
            out["reason"] = self.reason
        if self.model is not None:
            out["model"] = self.model
        if self.window is not None:
            out["window"] = self.window
        return out


class _CudaEvent:
    """A CUDA event recorded on the current stream of one device (no synchronisation)."""

    def __init__(self, index: int):
        import torch

        self.index = index
        self.event = torch.cuda.Event()

    def record(self):
        import torch

        self.event.record(torch.cuda.current_stream(self.index))

    def query(self) -> bool:
        return self.event.query()


def _carbon_setting(table: Optional[Mapping[str, str]], intensity: Optional[float],
                    source: Optional[str]) -> Tuple[float, str]:
    """The carbon intensity and its source: a number the user states, a CodeCarbon table entry
    (``carbon={"country": "FRA"}``, see ``energy/carbon_tables.py``), or the world-average default."""
    if table is not None:
        if intensity is not None or source is not None:
            raise ValueError("pass either carbon={...} (a CodeCarbon table entry) or carbon_intensity_g_per_kwh "
                             "(and carbon_source), not both")
        return intensity_from_tables(table)
    if intensity is None:
        return carbon_units.DEFAULT_CARBON_INTENSITY_G_PER_KWH, source or carbon_units.DEFAULT_CARBON_SOURCE
    carbon_units.check_intensity(intensity)
    return float(intensity), source or "stated by the user"


class Energy(Quantity):
    name = "energy"
    description = ("joules per step and device (GPU: NVML counter, CPU: RAPL), labelled measured/estimated/"
                   "unavailable with an error bound; energy/kwh and energy/co2_g for a stated carbon intensity")
    reduces = False  # reads only what every process has (its own devices, the all-reduced .grad)

    def __init__(self, schedule=None, *, estimate: Optional[Mapping[str, Any]] = None,
                 carbon_intensity_g_per_kwh: Optional[float] = None, carbon_source: Optional[str] = None,
                 carbon: Optional[Mapping[str, str]] = None, pue: float = 1.0, rel_error: float = 0.05,
                 powercap_root=POWERCAP_ROOT, gpu: bool = True,
                 nvml_counter: Optional[Callable[[int], Tuple[Callable[[], float], str]]] = None,
                 make_event: Optional[Callable[[int], Any]] = None, poll_s: float = 0.005):
        super().__init__(schedule)
        self.intensity, self.carbon_source = _carbon_setting(carbon, carbon_intensity_g_per_kwh, carbon_source)
        carbon_units.check_intensity(self.intensity, pue)
        if not rel_error > 0:
            raise ValueError(f"rel_error must be > 0, got {rel_error!r}")
        self.estimator = make_estimator(estimate)
        self.pue = float(pue)
        self.rel_error = float(rel_error)
        self.powercap_root = powercap_root
        self.gpu = gpu
        self.nvml_counter = nvml_counter
        self.make_event = make_event
        self.poll_s = poll_s
        self._rapl: Optional[RaplReader] = None
        self._static: Dict[str, DeviceEnergy] = {}  # devices that are unavailable throughout
        self._meters: Dict[str, Any] = {}  # "gpu0" -> GpuEnergyMeter
        self._gpu_closers: List[Callable[[], None]] = []
        self._pending: Dict[int, Dict[str, DeviceEnergy]] = {}  # step -> device -> value, until complete
        self._covers: Dict[int, int] = {}  # step -> number of steps its interval covers
        self._prev_step = -1
        self._prev_cpu: Any = None
        self._prev_est: Any = None
        self._prev_t = 0.0
        self._totals: Dict[str, Dict[str, Any]] = {}  # device -> run totals (for the processes' sum)
        self._identity: Dict[str, str] = {}  # device -> physical identity (GPU UUID; else host:device)

    def describe(self) -> Dict[str, Any]:
        out = super().describe()
        out.update({"carbon_intensity_g_per_kwh": self.intensity, "carbon_source": self.carbon_source,
                    "pue": self.pue, "rel_error": self.rel_error,
                    "estimate": self.estimator.model if self.estimator else None})
        return out

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, watched) -> None:
        self._start_cpu()
        if self.gpu:
            self._start_gpus(watched)
        self._prev_t = time.perf_counter()

    def _start_cpu(self) -> None:
        self._rapl = RaplReader(self.powercap_root)
        if self._rapl.available:
            self._prev_cpu = self._rapl.read_uj()
            return
        if isinstance(self.estimator, UnavailableEstimate):  # tdp_w="auto", CPU not in the table
            self._static["cpu"] = DeviceEnergy(UNAVAILABLE, "estimate", reason=(
                f"RAPL unavailable ({self._rapl.reason}); the requested estimate is unavailable: "
                f"{self.estimator.reason}"), model=self.estimator.model)
            return
        if isinstance(self.estimator, TdpEstimator):
            self._prev_est = self.estimator.read()
            return
        self._static["cpu"] = DeviceEnergy(UNAVAILABLE, "rapl", reason=self._rapl.reason)

    def _start_gpus(self, watched) -> None:
        indices = sorted({p.device.index or 0 for p in watched.params if p.device.type == "cuda"})
        if not indices and self.make_event is None:
            return  # a CPU model: no GPU device is reported at all
        from ..energy.nvml import GpuEnergyMeter, NvmlUnavailable
        from ..energy.zeus_counter import gpu_energy_counter  # NVML, else Zeus when installed

        for index in indices or [0]:
            device = f"gpu{index}"
            self._identity[device] = gpu_identity(index)
            try:
                opened = (self.nvml_counter or gpu_energy_counter)(index)
                read, label = opened[0], opened[1]
                if len(opened) > 2:
                    self._gpu_closers.append(opened[2])
                make_event = (lambda i=index: self.make_event(i)) if self.make_event else (lambda i=index: _CudaEvent(i))
                meter = GpuEnergyMeter(read, make_event, rel_error=self.rel_error, poll_s=self.poll_s, label=label)
                meter.mark(-1)
                self._meters[device] = meter
            except NvmlUnavailable as err:
                self._static[device] = DeviceEnergy(UNAVAILABLE, "nvml", reason=str(err))
            except Exception as err:  # never crash the user's run for an energy reading
                self._static[device] = DeviceEnergy(UNAVAILABLE, "nvml", reason=f"{type(err).__name__}: {err}")

    def after_step(self, ctx) -> None:
        step = ctx.step
        now = time.perf_counter()
        values = dict(self._static)
        values.update(self._cpu_values(now))
        self._covers[step] = step - self._prev_step
        self._prev_step, self._prev_t = step, now
        self._pending[step] = values
        for device, meter in list(self._meters.items()):
            meter.mark(step)
            self._take(device, meter, meter.collect(final=bool(meter.error)))
            if meter.error:
                self._drop_meter(device, meter)
        self._flush(ctx)

    def finish(self, ctx) -> None:
        """End of the run: close the GPU windows and write what is still pending."""
        try:
            for device, meter in list(self._meters.items()):
                self._take(device, meter, meter.finish())
                self._drop_meter(device, meter, reason="the run ended before the counter updated after this step")
            self._flush(ctx)
        finally:  # every process takes part in the gather, whatever happened above
            self._all_processes(ctx)

    def _all_processes(self, ctx) -> None:
        """Data parallel: the run's energy over all processes (each closes), combined per device."""
        dist = ctx.watched.dist
        if dist is not None:
            dist.enter(ctx.step, "energy.finish")
            mine = {"rank": dist.rank, "host": host(),
                    "devices": {d: dict(t, identity=self._identity.get(d, f"{host()}:{d}"))
                                for d, t in self._totals.items()}}
            everyone = dist.gather_objects(mine)
            if self._prev_step >= 0:
                ctx.emit_for_step(self._prev_step, "energy_all_processes", data=combine(everyone))

    def close(self) -> None:
        if self._rapl is not None:
            self._rapl.close()
        for meter in self._meters.values():
            meter.stop()
        self._meters.clear()
        for closer in self._gpu_closers:
            try:
                closer()
            except Exception:
                pass
        self._gpu_closers = []

    # -- devices ---------------------------------------------------------------------------------
    def _cpu_values(self, now: float) -> Dict[str, DeviceEnergy]:
        out: Dict[str, DeviceEnergy] = {}
        seconds = now - self._prev_t
        if self._rapl is not None and self._rapl.available:
            try:
                cur = self._rapl.read_uj()
            except RaplUnavailable as err:  # became unreadable mid-run
                self._rapl.available = False
                self._static["cpu"] = DeviceEnergy(UNAVAILABLE, "rapl", reason=str(err))
                return {"cpu": self._static["cpu"]}
            joules_by_device = self._rapl.delta_j(self._prev_cpu, cur)
            for d in self._rapl.domains:
                joules = joules_by_device[d.device]
                out[d.device] = DeviceEnergy(MEASURED, f"rapl:{d.zone} ({d.name}; whole socket, all processes)",
                                             joules, rapl_error_bound_j(joules, seconds))
            self._prev_cpu = cur
        elif isinstance(self.estimator, TdpEstimator):
            cur = self.estimator.read()
            joules, utilisation = self.estimator.joules(self._prev_est, cur)
            self._prev_est = cur
            reason = f"RAPL unavailable ({self._rapl.reason}); estimate requested by the user"
            out["cpu"] = DeviceEnergy(ESTIMATED, "estimate", joules, math.nan, reason=reason,
                                      model={**self.estimator.model, "utilisation": utilisation})
        return out

    def _take(self, device: str, meter, results: List[StepEnergy]) -> None:
        for r in results:
            values = self._pending.get(r.step)
            if values is None:
                continue
            if math.isfinite(r.error_j):
                values[device] = DeviceEnergy(MEASURED, meter.label, r.joules, r.error_j, window=r.as_dict())
            else:
                values[device] = DeviceEnergy(
                    UNAVAILABLE, meter.label,
                    reason="the energy counter did not update after this step before the run ended")

    def _drop_meter(self, device: str, meter, reason: Optional[str] = None) -> None:
        why = meter.error or reason
        meter.stop()
        self._meters.pop(device, None)
        for values in self._pending.values():
            values.setdefault(device, DeviceEnergy(UNAVAILABLE, meter.label, reason=why))
        if meter.error:
            self._static[device] = DeviceEnergy(UNAVAILABLE, meter.label, reason=meter.error)

    # -- records ---------------------------------------------------------------------------------
    def _flush(self, ctx) -> None:
        """Write every pending step whose devices all have a value."""
        for step in sorted(self._pending):
            values = self._pending[step]
            if any(device not in values for device in self._meters):
                break  # later steps wait for the same windows
            self._write(ctx, step, values)
            del self._pending[step]
            self._covers.pop(step, None)

    def _add_to_totals(self, values: Dict[str, DeviceEnergy]) -> None:
        """Run totals per device: joules and error bound of the steps it was measured (or estimated)
        on, and how many steps it was unavailable."""
        for device, v in values.items():
            t = self._totals.setdefault(device, {"joules": 0.0, "error_j": 0.0, "status": UNAVAILABLE,
                                                 "unavailable_steps": 0})
            if v.status == UNAVAILABLE:
                t["unavailable_steps"] += 1
                continue
            t["joules"] += v.joules
            t["error_j"] = math.nan if v.status == ESTIMATED else t["error_j"] + v.error_j
            t["status"] = ESTIMATED if ESTIMATED in (v.status, t["status"]) else MEASURED

    def _write(self, ctx, step: int, values: Dict[str, DeviceEnergy]) -> None:
        current = step == ctx.step

        def emit(key, value=None, reason=None):
            if current:
                ctx.emit_nan(key, reason) if reason is not None else ctx.emit(key, value)
            else:
                ctx.emit_for_step(step, key, value, reason=reason)

        counted = {d: v for d, v in values.items() if v.status != UNAVAILABLE}
        self._add_to_totals(values)
        for device, v in sorted(values.items()):
            if v.status == UNAVAILABLE:
                emit(f"energy/{device}", reason=f"{v.status}: {v.reason}")
            else:
                emit(f"energy/{device}", v.joules)
        missing = sorted(d for d, v in values.items() if v.status == UNAVAILABLE)
        if counted:
            total = math.fsum(v.joules for v in counted.values())
            emit("energy", total)
            emit("energy/kwh", carbon_units.joules_to_kwh(total))
            emit("energy/co2_g", carbon_units.co2_grams(total, self.intensity, self.pue))
        else:
            why = "; ".join(f"{d}: {values[d].reason}" for d in missing) or "no device to measure"
            for key in ("energy", "energy/kwh", "energy/co2_g"):
                emit(key, reason=f"unavailable: {why}")
        data: Dict[str, Any] = {d: v.provenance() for d, v in values.items()}
        estimated = any(v.status == ESTIMATED for v in counted.values())
        data["total"] = {  # "label", not "status": readers treat entries with a "status" as devices
            "label": UNAVAILABLE if not counted else (ESTIMATED if estimated else MEASURED),
            "devices": sorted(counted), "missing": missing,
            "error_j": math.nan if estimated or not counted else math.fsum(v.error_j for v in counted.values()),
        }
        dist = ctx.watched.dist
        if dist is not None:  # per step: process 0's devices; all processes at close (finish)
            data["total"]["scope"] = (f"the devices of process 0 only, of {dist.size} processes: the other "
                                      "processes' energy is not included here; the whole run over all "
                                      "processes is in data.energy_all_processes of the last step")
        data["steps"] = self._covers.get(step, 1)
        data["carbon_intensity_g_per_kwh"] = self.intensity
        data["carbon_source"] = self.carbon_source
        data["pue"] = self.pue
        if current:
            ctx.emit_data("energy", data)
        else:
            ctx.emit_for_step(step, "energy", data=data)
