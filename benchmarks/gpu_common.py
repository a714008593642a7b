"""What every stage of the one-shot GPU check (benchmarks/gpu_check.py) shares: check records, the
device set-up that makes CPU and CUDA runs comparable, and reading a stage's result file.

A stage returns ``{"stage": name, "checks": [check, ...], "figures": {...}}``; a check is
``{"name", "status", "detail"}`` with status PASS, FAIL or SKIPPED (a GPU-only check on a machine
without CUDA, or a missing package: the detail says which) and any figures it measured.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, Optional

import torch

PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"
T0 = time.time()


def check(name: str, status: str, detail: str = "", **figures: Any) -> Dict[str, Any]:
    return {"name": name, "status": status, "detail": detail, **figures}


def passed(ok: bool) -> str:
    return PASS if ok else FAIL


def say(what: str) -> None:
    """A progress line with the UTC time and the seconds since this process started."""
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} +{time.time() - T0:5.1f}s] {what}", flush=True)


def cuda_ok(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def no_cuda_reason(device: str) -> str:
    if not device.startswith("cuda"):
        return f"--device {device}: a GPU-only check (dry run of the machinery on the CPU)"
    return f"torch {torch.__version__} sees no CUDA device"


def comparable_numerics() -> None:
    """The same arithmetic on CPU and CUDA as far as torch allows: no TF32 in matrix products and
    convolutions, deterministic algorithms where they exist (a warning, not an error, where not;
    CUBLAS_WORKSPACE_CONFIG is set by gpu_check.sh before CUDA starts)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        torch.set_float32_matmul_precision("highest")
    except Exception:  # pragma: no cover - older torch
        pass
    torch.use_deterministic_algorithms(True, warn_only=True)


def write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, default=_plain)
    os.replace(tmp, path)


def read_json(path: str) -> Optional[Any]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _plain(x):
    if isinstance(x, float):
        return repr(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def stage_result(name: str, checks, figures=None) -> Dict[str, Any]:
    return {"stage": name, "checks": list(checks), "figures": figures or {}}
