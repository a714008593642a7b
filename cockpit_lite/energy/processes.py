"""The energy of a data-parallel run over all its processes, from each process's run totals.

Each process measures the devices it sees: the RAPL counters of its CPU socket (shared by every
process on that host: counting them once per process would count the socket several times) and
the GPUs that hold its parameters (usually one per process, but two processes may share one). So
the totals are combined per *physical* device, identified by ``identity`` (host and RAPL domain;
host and GPU UUID), each taken once, from the lowest-ranked process that measured it. The result
says which devices were shared, and is ``estimated`` as soon as one counted device is.

Computed once, at ``close`` (``Energy.finish``): per-step records stay process 0's (the other
processes' GPU windows close at different steps, so per-step sums would need a reduction at
moments the processes do not share).
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Dict, List

MEASURED, ESTIMATED, UNAVAILABLE = "measured", "estimated", "unavailable"


def host() -> str:
    return socket.gethostname()


def gpu_identity(index: int) -> str:
    """The GPU's UUID (the same physical GPU in every process, whatever CUDA_VISIBLE_DEVICES says),
    or a per-process name when it cannot be read."""
    try:
        import torch

        return f"{host()}:gpu:{torch.cuda.get_device_properties(index).uuid}"
    except Exception:
        return f"{host()}:pid{os.getpid()}:gpu{index}"


def combine(processes: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``processes``: per process ``{"rank", "host", "devices": {device: {"joules", "error_j", "status",
    "identity"}}}`` (run totals). Returns the run's energy over all processes (see the module docstring)."""
    chosen: Dict[str, Dict[str, Any]] = {}
    seen_by: Dict[str, List[int]] = {}
    for proc in sorted(processes, key=lambda p: p["rank"]):
        for device, v in sorted(proc["devices"].items()):
            ident = v["identity"]
            seen_by.setdefault(ident, []).append(proc["rank"])
            if ident not in chosen and v["status"] != UNAVAILABLE:
                chosen[ident] = dict(v, device=device, rank=proc["rank"])
    unavailable = sorted(i for i in seen_by if i not in chosen)
    out: Dict[str, Any] = {
        "processes": len(processes),
        "devices": {i: {"joules": v["joules"], "error_j": v["error_j"], "status": v["status"],
                        "from_rank": v["rank"], "seen_by_ranks": seen_by[i]} for i, v in sorted(chosen.items())},
        "unavailable": unavailable,
    }
    if not chosen:
        out.update(total_j=math.nan, error_j=math.nan, label=UNAVAILABLE)
        return out
    estimated = any(v["status"] == ESTIMATED for v in chosen.values())
    out["total_j"] = math.fsum(v["joules"] for v in chosen.values())
    out["error_j"] = math.nan if estimated else math.fsum(v["error_j"] for v in chosen.values())
    out["label"] = ESTIMATED if estimated else MEASURED
    shared = {i: r for i, r in seen_by.items() if len(r) > 1}
    if shared:
        out["shared"] = {i: f"measured by ranks {r}, counted once" for i, r in sorted(shared.items())}
    return out
