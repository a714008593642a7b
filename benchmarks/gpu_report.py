"""The GPU check's outputs from the stages' results: summary.json's content, summary.md, and the GPU
block of docs/benchmarks.md (benchmarks/gpu_check.py writes them; only formatting lives here)."""

from __future__ import annotations

import json
import math
from typing import Dict, Optional

from benchmarks import gpu_common as gc_

ORDER = (gc_.FAIL, gc_.PASS, gc_.SKIPPED)


def summary(results: Dict[str, dict], device: str, tiny: bool, elapsed: float) -> dict:
    checks = []
    for stage, r in results.items():
        for c in r.get("checks", []):
            checks.append(dict(c, stage=stage))
    counts = {s: sum(1 for c in checks if c["status"] == s) for s in ORDER}
    verdict = ("FAIL" if counts[gc_.FAIL] else "PASS" if counts[gc_.PASS] else "NOTHING CHECKED") + \
        f" ({counts[gc_.PASS]} passed, {counts[gc_.FAIL]} failed, {counts[gc_.SKIPPED]} skipped)"
    return {"verdict": verdict, "counts": counts, "device": device, "tiny": tiny, "elapsed_s": round(elapsed, 1),
            "stages": {name: {"elapsed_s": r.get("elapsed_s"), "limit_s": r.get("limit_s"), "figures": r.get("figures", {})}
                       for name, r in results.items()},
            "checks": checks}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(s: dict) -> str:
    lines = [f"# GPU check: {s['verdict']}", "",
             f"Device `{s['device']}`{' (--tiny)' if s['tiny'] else ''}, {s['elapsed_s']:.0f} s. "
             "Stages, time used / limit: " + ", ".join(
                 f"{n} {_num(v['elapsed_s'])}/{_num(v['limit_s'])} s" for n, v in s["stages"].items()), "",
             "| stage | check | status | detail |", "| --- | --- | --- | --- |"]
    for c in s["checks"]:
        status = f"**{c['status']}**" if c["status"] == gc_.FAIL else c["status"]
        lines.append(f"| {c['stage']} | {_cell(c['name'])} | {status} | {_cell(c['detail'])} |")
    lines += ["", "## Figures", ""]
    for name, st in s["stages"].items():
        figures = {k: v for k, v in (st.get("figures") or {}).items() if k != "rows"}
        if figures:
            lines += [f"### {name}", "", "```", json.dumps(figures, indent=1, default=str)[:6000], "```", ""]
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.0f}"


def gpu_block(timing: Optional[dict], device: str, s: dict) -> str:
    """docs/benchmarks.md's GPU block: the timing tables, and one line per other check."""
    from benchmarks import gpu_timing, run

    meta = run.machine(device if gc_.cuda_ok(device) else "cpu")
    command = "bash benchmarks/gpu_check.sh" + (" --device cpu --tiny" if s.get("tiny") else "")
    parts = [gpu_timing.block(timing, meta, command) if timing else
             "No timing figures: the timing stage wrote nothing (see summary.md)."]
    others = [c for c in s["checks"] if c["stage"] not in ("timing",)]
    if others:
        parts += ["", "Other checks of the same run (benchmarks/gpu_check.py; docs/gpu-check.md):", "",
                  "| check | status | detail |", "| --- | --- | --- |"]
        parts += [f"| {_cell(c['name'])} | {c['status']} | {_cell(c['detail'])} |" for c in others
                  if c["stage"] != "env" or c["status"] == gc_.FAIL]
    return "\n".join(parts)
