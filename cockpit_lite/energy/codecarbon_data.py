"""Where CodeCarbon's bundled offline tables are, read as plain files at run time.

CodeCarbon (optional extra ``carbon``) ships tables of carbon intensity by country and region and of
CPU thermal design powers. This project copies neither its data nor its code: it finds the installed
package directory with ``importlib.util.find_spec`` (which does not import codecarbon, so none of its
dependencies - pandas, requests, rapidfuzz, ... - are needed) and parses the JSON/CSV files itself.
``pip install --no-deps codecarbon`` is enough.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

EXTRA_HINT = ("install the optional extra: pip install 'cockpit-lite[carbon]' (only its data files are read, "
              "so pip install --no-deps codecarbon also works)")


class CodeCarbonMissing(ImportError):
    """codecarbon is not installed, so its tables cannot be read."""


def _find_spec(name: str):  # a seam for the tests (codecarbon absent)
    return importlib.util.find_spec(name)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("codecarbon")
    except Exception:
        return "unknown version"


def data_root(purpose: str) -> Path:
    """CodeCarbon's ``data`` directory; :class:`CodeCarbonMissing` naming the extra when it is absent."""
    spec: Optional[object] = None
    try:
        spec = _find_spec("codecarbon")
    except (ImportError, ValueError):
        spec = None
    locations = list(getattr(spec, "submodule_search_locations", None) or [])
    for location in locations:
        root = Path(location) / "data"
        if root.is_dir():
            return root
    raise CodeCarbonMissing(f"{purpose} reads CodeCarbon's bundled offline tables, but codecarbon is not "
                            f"installed; {EXTRA_HINT}")


def table(purpose: str, relative: str) -> Path:
    """The path of one table under CodeCarbon's data directory (FileNotFoundError naming it if absent)."""
    path = data_root(purpose) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{purpose}: the installed codecarbon ({_version()}) has no table {relative}; "
                                f"this project reads the layout of codecarbon>=2")
    return path


def label(relative: str) -> str:
    """How a table is named in the log: ``codecarbon <version> data/<relative>``."""
    return f"codecarbon {_version()} data/{relative}"


__all__ = ["CodeCarbonMissing", "EXTRA_HINT", "data_root", "table", "label"]
