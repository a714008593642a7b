"""Energy per step and cumulative energy / CO2, with each device's measured/estimated label."""

import numpy as np

from ._draw import PALETTE, downsample, draw_line, finish
from . import Instrument

J_PER_KWH = 3.6e6


def _covers(details):
    """``(steps, covered)``: sorted steps of the ``energy`` records and how many optimizer steps each
    covers (``data["energy"]["steps"]``, else 1; a step's last record wins)."""
    covers = {int(s): d.get("steps", 1) for s, d in details if isinstance(d, dict)}
    at = np.fromiter(covers, dtype=np.int64, count=len(covers))
    n = np.array([c or 1 for c in covers.values()], dtype=np.float64)
    order = np.argsort(at)
    return at[order], n[order]


def _covers_of(run):
    """``_covers`` from the ``steps`` entries alone (``run.data_field``), without the structures: a
    100,000-step run has one per step. Records without the entry cover 1 step, as in ``_covers``."""
    at, n = run.data_field("energy", "steps")
    n = np.where(np.isfinite(n) & (n != 0), n, 1.0)
    order = np.argsort(at, kind="stable")
    return at[order], n[order]


def _steps_covered(steps, details, table=None) -> np.ndarray:
    """How many optimizer steps each ``energy`` record covers (``data["energy"]["steps"]``, else 1).

    ``table``: ``_covers(details)`` when already computed (one dashboard panel needs it per device).
    Looked up with numpy: a Python loop over 100,000 steps is slow.
    """
    steps = np.asarray(steps, dtype=np.int64)
    at, n = _covers(details) if table is None else table
    out = np.ones(len(steps), dtype=np.float64)
    if len(at) and len(steps):
        i = np.minimum(np.searchsorted(at, steps), len(at) - 1)
        hit = at[i] == steps
        out[hit] = n[i[hit]]
    return np.maximum(out, 1.0)


def provenance(details) -> str:
    """'total: measured · gpu0: measured (nvml) · cpu0: measured (rapl)' from an ``energy`` data record."""
    parts = []
    total = details.get("total")
    if isinstance(total, dict) and total.get("label"):
        parts.append(f"total: {total['label']}")
    for device, info in details.items():
        if not isinstance(info, dict) or "status" not in info:
            continue
        text = f"{device}: {info['status']}"
        if info.get("source"):
            text += f" ({info['source']})"
        parts.append(text)
    if len(parts) > 4:  # keep the box inside the panel
        parts = parts[:4] + [f"+{len(parts) - 4} more"]
    if not parts:
        return "provenance not logged"
    lines = [parts[0]]
    for part in parts[1:]:  # pack into lines of at most ~48 characters, breaking only between devices
        if len(lines[-1]) + 3 + len(part) <= 48:
            lines[-1] += " · " + part
        else:
            lines.append(part)
    return "\n".join(lines)


class Energy(Instrument):
    name = "energy"
    tab = "energy"
    title = "Energy per step"
    group = "cost"
    keys = ("energy", "energy/kwh", "energy/co2_g")
    kind = "lines"
    description = "Joules per step (per device), cumulative kWh and gCO2eq; each value labelled measured/estimated."

    def draw(self, ax, run) -> None:
        steps, joules = run.series("energy")
        table = _covers_of(run)
        covers = _steps_covered(steps, None, table)  # a record may cover several steps (sparse schedule)
        per_step = joules / covers
        devices = [k for k in run.subkeys("energy") if k not in ("energy/kwh", "energy/co2_g")]
        draw_line(ax, steps, per_step, color=PALETTE[0], lw=1.4, label="total")
        for i, key in enumerate(devices[:4]):
            d_steps, d_joules = run.series(key)
            if d_steps.size and np.isfinite(d_joules).any():
                d = d_joules / _steps_covered(d_steps, None, table)
                draw_line(ax, d_steps, d, color=PALETTE[2 + i], lw=0.9, alpha=0.8, label=key.split("/", 1)[1])
        finite = np.where(np.isfinite(joules), joules, 0.0)
        cumulative_kwh = np.cumsum(finite) / J_PER_KWH
        twin = ax.twinx()
        s, c = downsample(steps, cumulative_kwh)
        twin.plot(s, c, color=PALETTE[1], lw=1.5, label="cumulative")
        twin.set_ylabel("cumulative kWh", color=PALETTE[1])
        twin.tick_params(axis="y", colors=PALETTE[1], labelsize="small")
        last = run.last_data("energy")
        label = provenance(last[1]) if last else "provenance not logged"
        intensity = last[1].get("carbon_intensity_g_per_kwh") if last else None
        _, co2 = run.series("energy/co2_g")
        if co2.size and np.isfinite(co2).any():
            total_co2 = float(np.nansum(co2))
        elif intensity:
            total_co2 = float(cumulative_kwh[-1] * intensity) if len(cumulative_kwh) else 0.0
        else:
            total_co2 = float("nan")
        total = f"total {cumulative_kwh[-1] * 1e3:.3g} Wh" if len(cumulative_kwh) else "total n/a"
        total += f", {total_co2:.3g} gCO₂eq" if np.isfinite(total_co2) else ", CO₂ n/a"
        if intensity:
            total += f" @ {intensity:g} g/kWh"
        # on the twin axes, which is drawn last: the box and legend stay above the cumulative line
        twin.text(0.02, 0.97, f"{label}\n{total}", transform=twin.transAxes, ha="left", va="top",
                fontsize="small", bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9), zorder=5)
        top = float(np.nanmax(per_step)) if np.isfinite(per_step).any() else 1.0
        box_lines = label.count("\n") + 2
        ax.set_ylim(bottom=0, top=max(top, 1e-12) * (1.15 + 0.15 * box_lines))  # room for the provenance box
        ax.set_title(self.title)
        finish(ax, "J per step")
        if len(devices) > 0:
            handles, labels = ax.get_legend_handles_labels()
            twin.legend(handles, labels, fontsize="x-small", loc="upper right", framealpha=0.9)
        ax.set_ylabel("J per step", color=PALETTE[0])
