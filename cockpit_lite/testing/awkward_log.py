"""A synthetic run log with everything that makes a dashboard mislead: alpha outliers far off any fixed
axis, a constant learning rate, a near-constant series (1 - 1e-7), sparse curvature with NaN steps, a
negative Hessian trace, a TIC swinging between thousands with large standard errors, gradient tests NaN
with reasons, a first step 100x slower than the rest, and the cockpit's own time. For the picture tests
(tests/instruments/test_dashboard_picture.py, tests/tensorboard/test_tensorboard_picture.py) and docs/images. The header says
``"synthetic": true``: these numbers come from no model."""

from __future__ import annotations

import math

import numpy as np


def write_awkward_log(logdir, steps: int = 400, *, seed: int = 0, tensorboard: bool = False):
    """Write ``logdir/cockpit.jsonl`` (and a TensorBoard event file with ``tensorboard``); return its path."""
    from cockpit_lite.runlog import RunLogWriter

    rng = np.random.default_rng(seed)
    params = ("0.weight", "0.bias", "2.weight", "2.bias")
    header = {"synthetic": True, "model": "Sequential", "optimizer": "SGD", "reduction": "mean",
              "params": [{"name": n, "shape": [], "numel": 1} for n in params],
              "quantities": {q: {"schedule": "every"} for q in (
                  "loss", "grad_norm", "param_norm", "distance", "update_size", "lr", "time", "alpha", "norm_test",
                  "inner_test", "ortho_test", "mean_gsnr", "hess_trace", "ggn_trace", "tic_diag", "tic_trace", "hess_max_ev",
                  "grad_hist_1d")}}
    writer = RunLogWriter(logdir, header)
    sinks = []
    if tensorboard:
        from cockpit_lite.tensorboard.writer import TensorBoardSink

        sinks.append(TensorBoardSink(logdir))

    def write(record):
        writer.write(record)
        for s in sinks:
            s.write(record)

    write({"type": "event", "step": 0, "wall": 1.7e9, "level": "info", "advisor": "on",
           "message": "advisor on: its rules run while training; a diagnosis is logged when one holds"})
    outliers = {37: 93.4, 151: -26.6, 260: 41.0}
    distance = 0.0
    for step in range(steps):
        frac = step / max(1, steps - 1)
        values, reasons, data = {}, {}, {}
        loss = 2.3 * math.exp(-3 * frac) + 0.1 + 0.05 * abs(rng.normal())
        if step == 120:
            loss = 2e299  # finite, far beyond float32: the TensorBoard tab must not call it inf unflagged
        values["loss"] = loss
        g = 1.2 * math.exp(-2 * frac) + 0.1 + 0.03 * abs(rng.normal())
        values["grad_norm"] = g
        for i, p in enumerate(params):
            values[f"grad_norm/{p}"] = g / (i + 2)
        values["param_norm"] = 10 + frac
        values["lr"] = 3e-4  # constant: not to be drawn on a zoomed +-5% axis, its label cut off
        update = 0.05 * g
        distance += update
        values["distance"] = distance
        values["update_size"] = update
        # constant to float precision (1 - 1e-7, as a clipped share of gradient elements is): the offset-label trap
        values["mean_gsnr"] = 1 - 1e-7 * (step % 2)
        values["time"] = (8.0 if step == 0 else 0.06) + 0.01 * abs(rng.normal())
        values["time/cockpit"] = (7.5 if step == 0 else 0.02) + 0.003 * abs(rng.normal())
        for name, base in (("norm_test", 0.5), ("inner_test", 0.3), ("ortho_test", 0.4)):
            if 200 <= step < 292:  # 92 NaN steps, with the reason
                values[name] = math.nan
                reasons[name] = "persample/conv.py: Conv2d with groups > 1 has no per-sample rule"
            else:
                values[name] = base * math.exp(0.3 * rng.normal())
        if step % 25 == 0:  # sparse curvature: every 25th step, one of them NaN
            if step == 100:
                for k in ("hess_trace", "ggn_trace", "tic_diag", "tic_trace", "hess_max_ev"):
                    values[k] = math.nan
                    reasons[k] = "quantities/_curvature.py: the replay of this step raised (out of memory)"
            else:
                ht = 40 * math.cos(6 * frac) - 10 + 5 * rng.normal()  # negative in places: non-convex region
                values["hess_trace"] = ht
                values["hess_trace/stderr"] = 6.0
                data["hess_trace"] = {"method": "hutchinson", "probes": 10}
                values["ggn_trace"] = 35 * math.exp(-frac) + rng.normal()
                values["ggn_trace/stderr"] = 2.0
                data["ggn_trace"] = {"method": "hutchinson", "probes": 10}
                values["tic_diag"] = float(rng.choice([3000.0, -5200.0, 800.0])) + 300 * rng.normal()
                values["tic_diag/stderr"] = 2500.0
                values["tic_trace"] = 1.5 + 0.5 * frac
                values["tic_trace/stderr"] = 0.3
                data["tic_trace"] = {"curvature": "estimate:hutchinson-diag-hessian", "probes": 10}
                values["hess_max_ev"] = 30 * math.exp(-frac) + rng.normal()
                values["hess_max_ev/error_bound"] = 1.5
                data["hess_max_ev"] = {"converged": step % 75 != 0, "hvps": 20, "method": "lanczos", "residual": 0.05,
                                       "error_bound": 1.5, "tol": 1e-3, "subbatch": None}
        if step % 50 == 0:
            edges = np.linspace(-4 * g, 4 * g, 101)
            counts, _ = np.histogram(np.clip(rng.normal(scale=g, size=5000), -4 * g, 4 * g), bins=edges)
            data["grad_hist_1d"] = {"edges": edges.tolist(), "counts": counts.tolist(), "scale": "B*g_ij",
                                    "clipped": int(counts[0] + counts[-1])}
        write({"type": "step", "step": step, "wall": 1.7e9 + 0.07 * step, "backward_passes": 1, "samples": 64,
               "values": values, **({"reasons": reasons} if reasons else {}), **({"data": data} if data else {})})
        if step >= 1:  # alpha of the previous step, amended one step later
            a = outliers.get(step - 1, -0.4 + 0.5 * frac + 0.3 * rng.normal())
            write({"type": "step", "step": step - 1, "amends": True, "values": {"alpha": a}})
    footer = {"steps": steps, "closed": "synthetic"}
    writer.close(footer)
    for s in sinks:
        s.close()
    return writer.path
