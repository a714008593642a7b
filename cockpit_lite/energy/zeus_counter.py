"""GPU energy counter through Zeus (``zeus.device.get_gpus``), for where NVML cannot be used.

Zeus wraps NVML for NVIDIA GPUs and amdsmi for AMD GPUs (ROCm builds of PyTorch report them as
``cuda`` devices); its ``get_total_energy_consumption(index)`` is a cumulative counter in mJ, like
NVML's, so the same sampling thread and window attribution apply. Zeus is optional: when it is not
installed :func:`gpu_energy_counter` behaves exactly as NVML alone. Zeus indexes the devices visible
to the process (``CUDA_VISIBLE_DEVICES`` / ``HIP_VISIBLE_DEVICES``), as CUDA indices do.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from .nvml import NvmlUnavailable, nvml_energy_counter


class ZeusNotInstalled(ImportError):
    pass


def _zeus_get_gpus() -> Callable[[], Any]:  # a seam for the tests
    try:
        from zeus.device import get_gpus
    except ImportError as err:
        raise ZeusNotInstalled(str(err)) from None
    return get_gpus


def zeus_energy_counter(cuda_index: int, get_gpus: Optional[Callable[[], Any]] = None
                        ) -> Tuple[Callable[[], float], str]:
    """``(read, label)``: ``read()`` is the cumulative energy of ``cuda_index`` in J via Zeus;
    NvmlUnavailable with the reason when Zeus cannot read it."""
    get_gpus = get_gpus or _zeus_get_gpus()
    try:
        gpus = get_gpus()
        if not gpus.supports_get_total_energy_consumption(cuda_index):
            raise NvmlUnavailable(f"Zeus: cuda:{cuda_index} has no total energy counter")
        gpus.get_total_energy_consumption(cuda_index)
        name = gpus.get_name(cuda_index)
    except NvmlUnavailable:
        raise
    except Exception as err:
        raise NvmlUnavailable(f"Zeus cannot read the energy counter of cuda:{cuda_index} "
                              f"({type(err).__name__}: {err})") from None

    def read() -> float:
        return gpus.get_total_energy_consumption(cuda_index) * 1e-3

    return read, f"zeus:{name}"


def gpu_energy_counter(cuda_index: int) -> Tuple[Any, ...]:
    """``(read, label[, shutdown])``: NVML's counter; if NVML cannot be used and Zeus is installed, Zeus's. Otherwise
    NvmlUnavailable with the reason(s)."""
    try:
        return nvml_energy_counter(cuda_index)
    except NvmlUnavailable as nvml_err:
        try:
            get_gpus = _zeus_get_gpus()
        except ZeusNotInstalled:
            raise nvml_err from None
        try:
            return zeus_energy_counter(cuda_index, get_gpus)
        except NvmlUnavailable as zeus_err:
            raise NvmlUnavailable(f"{nvml_err}; {zeus_err}") from None


__all__ = ["gpu_energy_counter", "zeus_energy_counter", "ZeusNotInstalled"]
