"""Markdown tables from the runner's rows (benchmarks/run.py): what README.md and results.md show.

Only formatting lives here; every number comes from a row measured by suite.py, cockpit_side.py or
scaling.py. Missing measurements print as "-" (not measured) or with their reason.
"""

from __future__ import annotations

import math
from typing import Dict, List


def _f(x, fmt="{:.1f}", missing="-"):
    return missing if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def header(meta: dict, command: str, elapsed_s: float) -> str:
    device = meta.get("device", "cpu")
    where = (f"on the GPU {meta['gpu']} ({device}; host: {meta['cpu']}, {meta['cores']} cores)" if device.startswith("cuda")
             else f"on the CPU: {meta['cpu']} ({meta['cores']} cores, {meta['torch_threads']} torch threads, {meta['gpu']})")
    memory = ("CUDA's peak allocated memory above what was allocated before the variant" if device.startswith("cuda")
              else "peak resident set above the process's size before the model was built")
    return (f"Measured {meta['date']} {where}, torch {meta['torch']}; command: `{command}` ({elapsed_s / 60:.1f} min). "
            "Time ratio = median over rounds of (variant / plain step in the same round; range: lowest and highest "
            f"round). Peak memory = {memory} (model, optimizer state, activations, cockpit state), plain loop measured "
            "right before each variant in one fresh subprocess (benchmarks/memory.py).")


def _mem(m, with_ratio=True):
    if not m:
        return "-"
    if "reason" in m:
        return "n/a"
    return f"{m['mb']:.0f} ({m['ratio']:.1f}x)" if with_ratio else f"{m['mb']:.0f}"


def targets_table(rows: List[dict]) -> str:
    lines = ["| problem | optimizer | variant | plain ms | variant ms | ratio (range) | target | met | floor, same run | "
             "peak MB (x plain) | HVPs/step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r.get("target"):
            continue
        lo, hi = r["ratio_spread"]
        lines.append(f"| {r['problem']} | {r['optimizer']} | {r['variant']} | {r['plain_ms']:.1f} | {r['ms']:.1f} | "
                     f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | <= {r['target']}x{_issue(r)} | {'yes' if r['met'] else '**no**'} | "
                     f"{_floor(r)} | {_mem(r.get('memory'))} | {_f(r['hvps_per_step'])} |")
    return "\n".join(lines)


def _floor(row) -> str:
    """The hand-written floor's ratio (benchmarks/floors.py) and what it says of the target."""
    f = row.get("floor_ratio")
    if f is None:
        return "-"
    if f > row["target"]:
        return f"{f:.2f}x: out of reach (floor misses by {f - row['target']:.2f}x)"
    return f"{f:.2f}x: {row['ratio'] - f:.2f}x above the floor"


def _issue(row) -> str:
    return f" (issue {row['target_issue']})" if row.get("target_issue") else ""


def _columns(rows):
    cols = []
    for r in rows:
        if (r["problem"], r["optimizer"]) not in cols:
            cols.append((r["problem"], r["optimizer"]))
    return cols


def _pivot(rows, first_row, cell) -> str:
    cols = _columns(rows)
    by = {(r["problem"], r["optimizer"], r["variant"]): r for r in rows}
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lines = ["| variant | " + " | ".join(f"{p} {o}" for p, o in cols) + " |", "| --- |" + " --- |" * len(cols)]
    lines.append(f"| {first_row[0]} | " + " | ".join(first_row[1](p, o) for p, o in cols) + " |")
    for v in variants:
        lines.append(f"| {v} | " + " | ".join(cell(by.get((p, o, v))) for p, o in cols) + " |")
    return "\n".join(lines)


def time_pivot(rows: List[dict]) -> str:
    plain = {}
    for r in rows:
        plain.setdefault((r["problem"], r["optimizer"]), r["plain_ms"])

    def cell(r):
        if r is None:
            return ""
        mark = "*" if r.get("nan") else ""
        return f"{r['ratio']:.2f}x{mark}"

    return _pivot(rows, ("plain step, ms", lambda p, o: f"{plain[(p, o)]:.1f}"), cell)


def memory_pivot(rows: List[dict]) -> str:
    plain: Dict[tuple, list] = {}
    for r in rows:
        m = r.get("memory")
        if m and "reason" not in m:
            plain.setdefault((r["problem"], r["optimizer"]), []).append(m["plain_mb"])

    def plain_cell(p, o):
        v = sorted(plain.get((p, o), []))
        return f"{v[len(v) // 2]:.0f}" if v else "-"

    def cell(r):
        return "" if r is None else _mem(r.get("memory"))

    return _pivot(rows, ("plain step, MB (median)", plain_cell), cell)


def notes(rows: List[dict]) -> str:
    """One line per problem and reason for the quantities that came out NaN (the reason is the one the
    log gave when the quantity was tracked alone, else the first one seen)."""
    reason_of: Dict[tuple, str] = {}
    for r in rows:
        for q in r.get("nan") or []:
            if r["variant"] == q or (r["problem"], q) not in reason_of:
                reason_of[(r["problem"], q)] = r["reason_by_quantity"].get(q, "")
    grouped: Dict[str, dict] = {}  # reason -> problems and quantities
    for (p, q), reason in reason_of.items():
        g = grouped.setdefault(reason if len(reason) <= 240 else reason[:237] + "...", {"problems": [], "names": set()})
        g["names"].add(q)
        if p not in g["problems"]:
            g["problems"].append(p)
    lines = [f"* NaN with a reason for {', '.join(sorted(g['names']))} on {', '.join(g['problems'])}; the log says: "
             f"\"{reason}\"" for reason, g in grouped.items()]
    reasons = {m.get("reason") for r in rows for m in [r.get("memory") or {}] if m.get("reason")}
    lines += [f"* peak memory not measured: {r}" for r in sorted(reasons)]
    return "\n".join(lines)


def full_table(rows: List[dict]) -> str:
    lines = ["| problem | optimizer | variant | plain ms | variant ms | ratio (range) | plain peak MB | peak MB (x plain) | HVPs/step | NaN |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lo, hi = r["ratio_spread"]
        m = r.get("memory") or {}
        lines.append(f"| {r['problem']} | {r['optimizer']} | {r['variant']} | {r['plain_ms']:.1f} | {r['ms']:.1f} | "
                     f"{r['ratio']:.2f}x ({lo:.2f}-{hi:.2f}) | {_f(m.get('plain_mb'), '{:.0f}')} | {_mem(m)} | "
                     f"{_f(r['hvps_per_step'])} | {', '.join(r.get('nan') or [])} |")
    return "\n".join(lines)


def legend(described: Dict[str, tuple], per_sample_every: int, alone: str, curvature: str, adam_on: str = "all",
           sets_on: str = "all") -> str:
    blank = []
    if alone != "all":
        blank.append("the quantities alone were timed " + (
            "with SGD only" if alone == "sgd" else "not at all" if alone == "none" else f"on {alone} with SGD only"))
    if adam_on != "all":
        blank.append(f"Adam was timed on {adam_on} only")
    if sets_on != "all":
        blank.append(f"the issues' sets (noise, noise+hist, alpha) were timed on {sets_on} only")
    if curvature != "all":
        blank.append(f"curvature on every step (the curvature quantities alone, business/full every step, "
                     f"full-like) was timed on {curvature} only, and where the issues set a target")
    return ("Variants (rows): " + "; ".join(f"`{n}`: {what}" for n, (_, _, what) in described.items()) +
            "; `<quantity>`: that quantity alone, every step. The default-schedule variants are timed in blocks of "
            f"whole per-sample periods ({per_sample_every} steps or multiples). `*`: some tracked quantities are NaN "
            "with a reason on that problem (see the notes)." + (f" Blank cells: not measured in this run ({'; '.join(blank)})."
                                                                if blank else ""))


def cockpit_tables(result) -> str:
    if result is None:
        return ""
    if isinstance(result, str):
        return f"Side by side with Cockpit: not run ({result})."
    times, values = result
    lines = ["Side by side with Cockpit (cockpit-for-pytorch, BackPACK), SGD without momentum, the same quantities "
             "every step, interleaved in one process (benchmarks/cockpit_side.py):", "",
             "| problem | set | plain ms | cockpit-lite ms (x plain) | Cockpit ms (x plain) | Cockpit / cockpit-lite |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in times:
        lines.append(f"| {r['problem']} | {r['set']} | {r['plain_ms']:.1f} | {r['lite_ms']:.1f} ({r['lite_ratio']:.2f}x) | "
                     f"{r['cockpit_ms']:.1f} ({r['cockpit_ratio']:.2f}x) | {r['cockpit_ms'] / r['lite_ms']:.1f}x |")
    lines += ["", "Same values on the same batches (3 SGD steps from one initial model; largest relative difference "
              "over steps and parameters):", "",
              "| problem | quantity | values compared | max relative difference | note |", "| --- | --- | --- | --- | --- |"]
    for r in values:
        lines.append(f"| {r['problem']} | {r['quantity']} | {r['compared']} | {_f(r['max_rel_diff'], '{:.1e}')} | {r['note']} |")
    return "\n".join(lines)


def scaling_tables(rows: List[dict]) -> str:
    if not rows:
        return ""
    from benchmarks.scaling import SET
    out = [f"Scaling of the overhead of one set ({', '.join(SET)}; every step, SGD; benchmarks/scaling.py):", "",
           "| problem | batch | plain ms | watched ms | ratio | plain peak MB | watched peak MB | extra MB |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kind"] != "batch":
            continue
        m = r.get("memory") or {}
        ok = m and "reason" not in m
        out.append(f"| {r['problem'].split('-')[0]} | {r['batch_size']} | {r['plain_ms']:.1f} | {r['ms']:.1f} | {r['ratio']:.2f}x | "
                   f"{_f(m.get('plain_mb') if ok else None, '{:.0f}')} | {_f(m.get('mb') if ok else None, '{:.0f}')} | "
                   f"{_f(m.get('extra_mb') if ok else None, '{:.0f}')} |")
    widths = [r for r in rows if r["kind"] == "width"]
    if widths:
        out += ["", "| MLP hidden widths | batch | plain ms | watched ms | ratio |", "| --- | --- | --- | --- | --- |"]
        for r in widths:
            out.append(f"| {r['hidden']}-{r['hidden'] // 2} | {r['batch_size']} | {r['plain_ms']:.1f} | {r['ms']:.1f} | {r['ratio']:.2f}x |")
    return "\n".join(out)
