"""Registry of quantities by name. Third parties add theirs through the entry-point group
``cockpit_lite.quantities`` (name = quantity name, object = a ``Quantity`` subclass) or ``register``.
"""

from __future__ import annotations

import importlib
from typing import Dict, List, Type

from ..runlog.keys import builtin_quantities
from .base import Quantity, Watched

REGISTRY: Dict[str, Type[Quantity]] = {}


def register(cls: Type[Quantity]) -> Type[Quantity]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def builtin_names() -> List[str]:
    """The built-in quantities: one module per quantity, named like it (``grad_norm.py``), in name order.
    This package's modules are the one list of quantities; the log reader (``runlog.keys``), the
    synthetic log (``cockpit_lite.testing``) and the panel registry's drift test derive from it."""
    return list(builtin_quantities())


def _register_builtin() -> None:
    for name in builtin_names():
        module = importlib.import_module(f"{__name__}.{name}")
        found = [obj for obj in vars(module).values() if isinstance(obj, type) and issubclass(obj, Quantity)
                 and obj.__module__ == module.__name__ and obj.name == name]
        if len(found) != 1:
            raise ImportError(f"cockpit_lite/quantities/{name}.py must define one Quantity subclass named {name!r}")
        register(found[0])


_register_builtin()


def _from_entry_points(name: str):
    from importlib.metadata import entry_points

    eps = entry_points()
    group = eps.select(group="cockpit_lite.quantities") if hasattr(eps, "select") else eps.get("cockpit_lite.quantities", [])
    for ep in group:
        if ep.name == name:
            return register(ep.load())
    return None


def make(name: str, schedule=None) -> Quantity:
    cls = REGISTRY.get(name) or _from_entry_points(name)
    if cls is None:
        raise ValueError(f"unknown quantity {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return cls(schedule)


__all__ = ["Quantity", "Watched", "REGISTRY", "register", "make", "builtin_names"]
