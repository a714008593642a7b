"""The TensorBoard tab's panels, derived from the instrument registry (no list of its own).

Each instrument names the tab panel that shows it (``Instrument.tab``, default its own name);
instruments with the same ``tab`` share a panel. Panels come in the dashboard's order: by group
(:data:`cockpit_lite.instruments.GROUPS`), then in registry order. The plugin serves this list
(``/data/plugin/cockpit_lite/panels``); ``static/index.js`` draws each panel with its own renderer
when it has one (``RENDERERS``) and by ``kind`` otherwise, so a new instrument shows up in the
tab without a change to the frontend.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List


def _describe(inst) -> Dict[str, Any]:
    """``inst.describe()``, or the same fields read off an object that is not an ``Instrument``."""
    if hasattr(inst, "describe"):
        desc = dict(inst.describe())
    else:
        desc = {"name": inst.name, "title": inst.title, "group": inst.group, "keys": list(inst.keys),
                "data_keys": list(getattr(inst, "data_keys", ())), "kind": getattr(inst, "kind", "lines"),
                "description": getattr(inst, "description", "")}
    desc["tab"] = desc.get("tab") or getattr(inst, "tab", "") or desc["name"]
    return desc


def tab_panels(found: Iterable[Any]) -> List[Dict[str, Any]]:
    """One entry per tab panel: ``id``, ``title``, ``group``, ``kind``, ``description`` (of its first
    instrument), ``keys`` and ``data_keys`` (of all its instruments, in order) and ``instruments`` (their
    names). ``found``: the instruments (``cockpit_lite.instruments.tab_panels()`` passes
    :func:`cockpit_lite.instruments.discover`'s)."""
    from ._base import GROUPS

    descs = [_describe(i) for i in found]
    order = {g: n for n, g in enumerate(GROUPS)}
    descs.sort(key=lambda d: order.get(d["group"], len(order)))  # stable: registry order within a group
    panels: Dict[str, Dict[str, Any]] = {}
    for d in descs:
        p = panels.get(d["tab"])
        if p is None:
            p = panels[d["tab"]] = {"id": d["tab"], "title": d["title"], "group": d["group"], "kind": d["kind"],
                                    "description": d.get("description", ""), "keys": [], "data_keys": [],
                                    "instruments": []}
        p["keys"] += [k for k in d["keys"] if k not in p["keys"]]
        p["data_keys"] += [k for k in d.get("data_keys", []) if k not in p["data_keys"]]
        p["instruments"].append(d["name"])
    return list(panels.values())


__all__ = ["tab_panels"]
