"""A synthetic run log with every key of docs/record-keys.md, for tests, demos and benchmarks.

The numbers follow plausible training dynamics (a decaying loss, a growing distance, alpha that
drifts from understepping to overshooting) but are not computed from any model: the file says so
in its header (``"synthetic": true``).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np

from cockpit_lite.runlog.keys import builtin_quantities

#: every built-in quantity (the modules of cockpit_lite.quantities); tests check each has values here
ALL = builtin_quantities()
PARAMS = ("0.weight", "0.bias", "2.weight", "2.bias")


def write_synthetic_log(logdir, steps: int = 200, *, quantities: Optional[Iterable[str]] = None,
                        optimizer: str = "SGD", seed: int = 0, hist_every: int = 10, curvature_every: int = 5,
                        lr_groups: int = 1, energy_status: str = "measured", energy_every: int = 1):
    """Write ``logdir/cockpit.jsonl`` with ``steps`` step records; return its path.

    ``quantities``: the quantity names to include (default: all of :data:`ALL`).
    ``optimizer="Adam"``: ``cabs`` is logged as NaN with a reason, as the real quantity does.
    """
    from cockpit_lite.runlog import RunLogWriter

    q = set(ALL if quantities is None else quantities)
    rng = np.random.default_rng(seed)
    header = {"synthetic": True, "model": "Sequential", "optimizer": optimizer, "reduction": "mean",
              "params": [{"name": n, "shape": [], "numel": 1} for n in PARAMS],
              "quantities": {name: {"schedule": "every"} for name in sorted(q)}}
    writer = RunLogWriter(logdir, header)
    distance = 0.0
    pending_alpha = None
    # vectorised draws keep a 100,000-step log quick to write
    noise = rng.normal(size=(15, steps))
    for step in range(steps):
        frac = step / max(1, steps - 1)
        values, reasons, data = {}, {}, {}
        loss = 2.3 * math.exp(-4 * frac) + 0.05 + 0.08 * abs(noise[0, step])
        if "loss" in q:
            values["loss"] = loss
        g = 1.5 * math.exp(-2 * frac) + 0.1 + 0.05 * abs(noise[1, step])
        if "grad_norm" in q:
            values["grad_norm"] = g
            for i, p in enumerate(PARAMS):
                values[f"grad_norm/{p}"] = g / (i + 2)
        if "grad_norm_preclip" in q:
            values["grad_norm_preclip"] = g * (1 + 2 * abs(noise[1, step]))  # clipping fired where larger
        if "param_norm" in q:
            values["param_norm"] = 10 + frac
        lr = 0.1 * (0.1 if frac > 0.7 else 1.0)
        update = lr * g * (1 + 0.1 * noise[2, step])
        distance += update * 0.6
        if "distance" in q:
            values["distance"] = distance
        if "update_size" in q:
            values["update_size"] = abs(update)
        if "lr" in q:
            values["lr"] = lr
            if lr_groups > 1:
                for i in range(lr_groups):
                    values[f"lr/group{i}"] = lr / (10 ** i)
        if "time" in q:
            values["time"] = 0.05 + 0.005 * abs(noise[3, step])
            values["time/cockpit"] = 0.002 + 0.0005 * abs(noise[4, step])
        for row, (name, base) in enumerate((("norm_test", 0.4), ("inner_test", 0.25), ("ortho_test", 0.3))):
            if name in q:
                values[name] = base * (1 + 3 * frac) * math.exp(0.3 * noise[5, step] + 0.25 * noise[12 + row, step])
        if "mean_gsnr" in q:
            values["mean_gsnr"] = 0.5 * math.exp(-2 * frac) * math.exp(0.2 * noise[6, step])
        if "early_stopping" in q:
            values["early_stopping"] = -0.8 + 1.2 * frac + 0.05 * noise[7, step]
        if "cabs" in q:
            if optimizer == "SGD":
                values["cabs"] = 32 + 200 * frac + 5 * noise[8, step]
            else:
                values["cabs"] = math.nan
                reasons["cabs"] = f"CABS is defined for SGD without momentum; the optimizer is {optimizer}"
        if "grad_hist_1d" in q and step % hist_every == 0:
            width = 4 * g
            edges = np.linspace(-width, width, 101)
            samples = rng.normal(scale=g, size=5000)
            counts, _ = np.histogram(np.clip(samples, -width, width), bins=edges)
            data["grad_hist_1d"] = {"edges": edges.tolist(), "counts": counts.tolist(), "scale": "B*g_ij"}
        if "grad_hist_2d" in q and step % hist_every == 0:
            gx = rng.normal(scale=g, size=4000)
            th = rng.normal(scale=0.5, size=4000) + 0.3 * gx
            counts, xe, ye = np.histogram2d(gx, th, bins=(40, 30))
            data["grad_hist_2d"] = {"x_edges": xe.tolist(), "y_edges": ye.tolist(), "counts": counts.astype(int).tolist(),
                                    "x": "B*g_ij", "y": "theta_j"}
        if "hess_max_ev" in q and step % curvature_every == 0:
            values["hess_max_ev"] = 40 * math.exp(-frac) + 2 * noise[9, step]
            values["hess_max_ev/hvps"] = 20
            values["hess_max_ev/error_bound"] = 4e-3 * values["hess_max_ev"]
            data["hess_max_ev"] = {"converged": step % (7 * curvature_every) != 0, "hvps": 20, "method": "lanczos",
                                   "residual": 1e-4, "error_bound": values["hess_max_ev/error_bound"], "tol": 1e-3,
                                   "subbatch": None}
        for name, scale in (("hess_trace", 300.0), ("ggn_trace", 250.0)):
            if name in q and step % curvature_every == 0:
                value = scale * math.exp(-1.5 * frac) * (1 + 0.05 * noise[10, step])
                values[name] = value
                values[f"{name}/stderr"] = 0.08 * value
                for p in PARAMS:
                    values[f"{name}/{p}"] = value / len(PARAMS)
                data[name] = {"method": "hutchinson", "probes": 20}
        if "tic_diag" in q and step % curvature_every == 0:
            values["tic_diag"] = 3 + frac + 0.1 * noise[11, step]
            values["tic_diag/stderr"] = 0.0
            data["tic_diag"] = {"curvature": "exact:backpack-diag-hessian", "probes": 0}
        if "tic_trace" in q and step % curvature_every == 0:
            values["tic_trace"] = 1.5 + 0.5 * frac
            values["tic_trace/stderr"] = 0.05 * values["tic_trace"]
            data["tic_trace"] = {"curvature": "estimate:hutchinson-diag-hessian", "probes": 30}
        if "energy" in q and step % energy_every == energy_every - 1:  # a record covers energy_every steps
            cpu_status = "estimated" if energy_status == "measured" else "unavailable"
            if energy_status == "unavailable":
                values["energy"] = math.nan
                reasons["energy"] = "no energy counter: no NVIDIA GPU and RAPL is not readable"
            else:
                joules = (12 + abs(noise[3, step])) * energy_every
                values["energy"] = joules
                values["energy/gpu0"] = joules * 0.8
                values["energy/cpu"] = joules * 0.2
                values["energy/kwh"] = joules / 3.6e6
                values["energy/co2_g"] = joules / 3.6e6 * 400
            data["energy"] = {"gpu0": {"status": energy_status, "source": "nvml", "error_j": 0.1},
                              "cpu": {"status": cpu_status, "source": "tdp-model", "error_j": 2.0,
                                      "reason": "RAPL is not readable", "model": {"tdp_w": 65}},
                              "total": {"label": cpu_status if energy_status == "measured" else energy_status,
                                        "devices": ["gpu0", "cpu"], "missing": [], "error_j": 2.1},
                              "steps": energy_every, "carbon_intensity_g_per_kwh": 400.0,
                              "carbon_source": "world average", "pue": 1.0}
        writer.write({"type": "step", "step": step, "wall": 1.7e9 + 0.05 * step, "backward_passes": 1,
                      "values": values, **({"reasons": reasons} if reasons else {}), **({"data": data} if data else {})})
        if pending_alpha is not None:  # alpha of the previous step is known now: an amendment
            writer.write(pending_alpha)
            pending_alpha = None
        if "alpha" in q:
            a = -0.6 + 1.4 * frac + 0.35 * noise[4, step]
            pending_alpha = {"type": "step", "step": step, "amends": True, "values": {"alpha": a},
                             "data": {"alpha": {"t": abs(update), "f0": loss, "f1": loss * 0.99, "df0": -g, "df1": -0.5 * g,
                                                "var_f0": 0.01, "var_f1": 0.01, "var_df0": 0.1, "var_df1": 0.1,
                                                "w": [loss, -g, 1.0]}}}
    writer.close({"steps": steps, "closed": "synthetic"})
    return writer.path
