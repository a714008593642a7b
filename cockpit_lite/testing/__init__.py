"""Test support: synthetic run logs for tests, demos, benchmarks and docs/images. The library itself
never imports this package; the numbers in these logs come from no model (their header says
``"synthetic": true``).

* :func:`write_synthetic_log`: every key of docs/record-keys.md, plausible dynamics;
* :func:`write_awkward_log`: everything that makes a dashboard mislead (outliers, NaN steps, ...).
"""

from __future__ import annotations

from .awkward_log import write_awkward_log
from .synthetic_log import ALL, PARAMS, write_synthetic_log

__all__ = ["ALL", "PARAMS", "write_synthetic_log", "write_awkward_log"]
