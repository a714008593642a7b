"""Energy per step and cumulative energy / CO2, with each device's measured/estimated label."""

import textwrap

import numpy as np

from ._draw import PALETTE, downsample, draw_line, finish
from ._nan_note import nan_counts
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


def total_error_j(run, steps, finite):
    """``(bound_j, state)`` of the summed energy over the steps where it is finite: the sum of the records'
    ``total.error_j`` (a bound per record, so their sum bounds the sum). ``state``: "bound" (a finite
    bound), "no bound" (some finite step is an estimate whose ``error_j`` is NaN), "not logged" (some
    finite step has no ``error_j`` at all: an older log). Read as a column (``Run.data_field``), which a run
    read from its cache answers without decoding every step's structure."""
    wanted = np.asarray(steps)[finite]
    if not len(wanted):
        return float("nan"), "not logged"
    e_steps, errors = run.data_field("energy", "total.error_j")
    by_step = dict(zip(np.asarray(e_steps).tolist(), np.asarray(errors).tolist()))  # a step's last record wins
    values = [by_step.get(int(s)) for s in wanted.tolist()]
    if any(v is None for v in values):
        return float("nan"), "not logged"
    if not all(np.isfinite(v) for v in values):
        return float("nan"), "no bound"
    return float(np.sum(np.abs(values))), "bound"


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
        ok = np.isfinite(joules)
        cumulative_kwh = np.cumsum(np.where(ok, joules, 0.0)) / J_PER_KWH
        total_kwh = float(cumulative_kwh[-1]) if len(cumulative_kwh) else float("nan")
        # a step whose energy is NaN (with a reason) cost something unknown, not 0 J: the cumulative line has a
        # gap there (it resumes at the sum of the finite steps), and the total says over which steps it sums
        shown = np.where(ok, cumulative_kwh, np.nan)
        twin = ax.twinx()
        s, c = downsample(steps, shown)
        twin.plot(s, c, color=PALETTE[1], lw=1.5, label="cumulative",
                  marker="." if (~ok).any() and len(s) <= 200 else None, ms=3)
        twin.set_ylabel("cumulative kWh", color=PALETTE[1])
        twin.tick_params(axis="y", colors=PALETTE[1], labelsize="small")
        last = run.last_data("energy")
        label = provenance(last[1]) if last else "provenance not logged"
        intensity = last[1].get("carbon_intensity_g_per_kwh") if last else None
        _, co2 = run.series("energy/co2_g")
        if co2.size and np.isfinite(co2).any():
            total_co2 = float(np.nansum(co2))
        elif intensity:
            total_co2 = total_kwh * intensity if len(cumulative_kwh) else 0.0
        else:
            total_co2 = float("nan")
        if len(cumulative_kwh) and ok.any():
            total = f"total {total_kwh * 1e3:.3g} Wh"
            bound_j, state = total_error_j(run, steps, ok)
            if state == "bound":
                total += f" ± {bound_j / 3.6e3:.2g} Wh"
            elif state == "no bound":
                total += " (estimated, no bound)"
            else:
                total += " (no error bound logged)"
            k_nan, _, reason = nan_counts(run, "energy")
            if k_nan or not ok.all():
                n_all, n_ok = int(covers.sum()), int(covers[ok].sum())
                total += (f" over {n_ok} of {n_all} steps; {n_all - n_ok} NaN: "
                          f"{reason or 'no reason logged'}")
        else:
            total = "total n/a"
        co2_text = f"{total_co2:.3g} gCO₂eq" if np.isfinite(total_co2) else "CO₂ n/a"
        if intensity:
            co2_text += f" @ {intensity:g} g/kWh"
        total = textwrap.fill(total, 56, subsequent_indent="  ", break_on_hyphens=False) + "\n" + co2_text
        # on the twin axes, which is drawn last: the box and legend stay above the cumulative line
        twin.text(0.02, 0.97, f"{label}\n{total}", transform=twin.transAxes, ha="left", va="top",
                fontsize="small", bbox=dict(boxstyle="round", fc="white", ec="0.8", alpha=0.9), zorder=5)
        top = float(np.nanmax(per_step)) if np.isfinite(per_step).any() else 1.0
        box_lines = label.count("\n") + total.count("\n") + 1
        ax.set_ylim(bottom=0, top=max(top, 1e-12) * (1.15 + 0.15 * box_lines))  # room for the provenance box
        ax.set_title(self.title)
        finish(ax, "J per step")
        if len(devices) > 0:
            handles, labels = ax.get_legend_handles_labels()
            twin.legend(handles, labels, fontsize="x-small", loc="upper right", framealpha=0.9)
        ax.set_ylabel("J per step", color=PALETTE[0])
