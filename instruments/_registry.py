"""The instrument registry: the built-in instruments (one per module of this package), the
third-party ones (entry-point group ``cockpit_lite.instruments``), selection by name."""

from __future__ import annotations

import os
import warnings
from importlib import metadata
from typing import Any, Dict, Iterable, List, Optional

from ._base import GROUPS, Instrument

GROUP_ENTRY_POINTS = "cockpit_lite.instruments"

#: built-in quantities that no built-in instrument reads, and why (tests/project/test_registries.py checks that
#: every other quantity has a panel)
PANEL_LESS: Dict[str, str] = {
    "param_norm": "context for distance: drawn in the TensorBoard tab's distances panel, no dashboard panel",
}

#: dashboard order within a group (a display preference, not a list to keep complete: an instrument
#: module not named here comes after these, by name)
ORDER = ("alpha_gauge", "alpha_trace", "distance", "hyperparameters", "cabs",
         "grad_norm", "grad_norm_preclip", "grad_flow", "gradient_tests", "gradient_tests_history", "grad_hist_1d",
         "grad_hist_2d", "gsnr", "early_stopping",
         "hess_max_ev", "traces", "tic",
         "performance", "advisor",
         "step_time", "energy")


def builtin_modules() -> List[str]:
    """The modules of this package that hold an instrument (one each, named like it; support modules
    start with ``_``), in :data:`ORDER`."""
    import pkgutil

    found = [m.name for m in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]) if not m.name.startswith("_")]
    rank = {name: n for n, name in enumerate(ORDER)}
    return sorted(found, key=lambda name: (rank.get(name, len(rank)), name))


def builtin() -> List[Instrument]:
    """The instruments shipped with cockpit-lite, in dashboard order: one per module of this package."""
    import importlib

    out = []
    for name in builtin_modules():
        module = importlib.import_module(f"{__package__}.{name}")
        found = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Instrument)
                 and obj.__module__ == module.__name__ and obj.name]
        if len(found) != 1:
            raise ImportError(f"instruments/{name}.py must define one Instrument subclass with a name")
        out.append(found[0]())
    return out


def _entry_points():
    try:
        return list(metadata.entry_points(group=GROUP_ENTRY_POINTS))
    except TypeError:  # Python < 3.10
        return list(metadata.entry_points().get(GROUP_ENTRY_POINTS, []))


def _as_instruments(obj: Any) -> List[Instrument]:
    if isinstance(obj, type):
        obj = obj()
    elif callable(obj) and not hasattr(obj, "draw"):
        obj = obj()
    items = list(obj) if isinstance(obj, (list, tuple)) else [obj]
    for item in items:
        for attr in ("name", "title", "group", "keys", "draw", "missing"):
            if not hasattr(item, attr):
                raise TypeError(f"{item!r} is not an instrument: it has no {attr!r}")
        if item.group not in GROUPS:
            raise ValueError(f"instrument {item.name!r} has unknown group {item.group!r}; use one of {GROUPS}")
    return items


def third_party() -> List[Instrument]:
    """Instruments registered under the entry-point group; a broken one is skipped with a warning."""
    found: List[Instrument] = []
    for ep in _entry_points():
        try:
            found.extend(_as_instruments(ep.load()))
        except Exception as err:
            warnings.warn(f"cockpit-lite: instrument entry point {ep.name!r} ({ep.value}) could not be loaded: "
                          f"{type(err).__name__}: {err}", RuntimeWarning, stacklevel=2)
    return found


def discover() -> List[Instrument]:
    """Built-in instruments, then third-party ones (a third-party name that clashes is skipped)."""
    out = builtin()
    names = {i.name for i in out}
    for inst in third_party():
        if inst.name in names:
            warnings.warn(f"cockpit-lite: a third-party instrument is named {inst.name!r} like an existing one; "
                          "it was skipped", RuntimeWarning, stacklevel=2)
            continue
        names.add(inst.name)
        out.append(inst)
    return out


def select(names: Optional[Iterable[str]], available: Optional[List[Instrument]] = None) -> List[Instrument]:
    """The instruments called ``names`` (all when ``names`` is None), in the order given."""
    available = discover() if available is None else available
    if names is None:
        return list(available)
    by_name = {i.name: i for i in available}
    wanted = [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise ValueError(f"unknown instrument(s) {', '.join(unknown)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


def tab_panels(found: Optional[Iterable[Any]] = None) -> List[Dict[str, Any]]:
    """The TensorBoard tab's panels: the instruments grouped by their ``tab`` (see ``_tab_panels``)."""
    from ._tab_panels import tab_panels as _tab_panels

    return _tab_panels(discover() if found is None else found)
