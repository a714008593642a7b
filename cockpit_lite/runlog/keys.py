"""Telling a mistyped key from a quantity that simply has no values in a run.

``Run.series(key)`` of a key that is in no record returns empty arrays when the key belongs to a
quantity cockpit-lite knows (its name is the part before the first ``/``: ``grad_norm/fc.weight``,
``hess_trace/stderr``): a quantity that was not tracked, or not yet. Any other key is a mistake
(``run.series("grad_nrom")``), answered with a ``KeyError`` that suggests the close matches.
The known quantities are those the run's header lists, the built-in ones (the modules of
``cockpit_lite.quantities``, found without importing them, so reading a log does not import torch)
and those installed through the ``cockpit_lite.quantities`` entry-point group.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import pkgutil
from typing import Any, Dict, FrozenSet, Iterable, Tuple

_NOT_QUANTITIES = frozenset({"base"})

#: the named parts of a quantity's key (``hess_trace/stderr``), as opposed to its per-parameter values
#: (``grad_norm/0.weight``): the summary (``cockpit-lite summary``) and the TensorBoard tab show these
SUMMARY_PARTS = ("stderr", "error_bound", "hvps", "cockpit", "device", "kwh", "co2_g")


def is_summary_part(key: str) -> bool:
    """Whether ``key`` is ``<quantity>/<one of SUMMARY_PARTS>``."""
    parts = key.split("/")
    return len(parts) == 2 and parts[1] in SUMMARY_PARTS


@functools.lru_cache(maxsize=1)
def builtin_quantities() -> Tuple[str, ...]:
    """Names of the built-in quantities, sorted: the modules of ``cockpit_lite.quantities`` (one per
    quantity, named like it), found without importing them."""
    spec = importlib.util.find_spec("cockpit_lite.quantities")
    if spec is None or not spec.submodule_search_locations:
        return ()
    return tuple(sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)
                        if not m.name.startswith("_") and m.name not in _NOT_QUANTITIES))


@functools.lru_cache(maxsize=1)
def installed_quantities() -> FrozenSet[str]:
    """Names of the built-in and entry-point quantities."""
    names = set(builtin_quantities())
    try:
        from importlib.metadata import entry_points

        eps = entry_points()
        group = (eps.select(group="cockpit_lite.quantities") if hasattr(eps, "select")
                 else eps.get("cockpit_lite.quantities", []))
        names.update(ep.name for ep in group)
    except Exception:  # broken metadata: the built-in names still count
        pass
    return frozenset(names)


def is_known(key: str, header: Dict[str, Any]) -> bool:
    """Whether ``key`` belongs to a quantity (see the module's docstring)."""
    base = key.split("/", 1)[0]
    quantities = header.get("quantities")
    return (isinstance(quantities, dict) and base in quantities) or base in installed_quantities()


def unknown_key(key: str, keys: Iterable[str]) -> KeyError:
    """The ``KeyError`` for ``key``, naming the close matches among ``keys`` (the run's keys)."""
    keys = list(keys)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        hint = "did you mean " + " or ".join(repr(k) for k in close) + "?"
    else:
        shown = [k for k in keys if "/" not in k][:12]
        hint = "its keys are " + ", ".join(map(repr, shown)) if shown else "it has no scalar values"
    return KeyError(f"{key!r} is in no record of this run and is no quantity's key; {hint}")
