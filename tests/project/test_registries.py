"""One list per thing: every list of quantities, panels, presets and key parts derives from one
registry, and these tests fail when one drifts (issue 18).

The lists: quantities = the modules of ``cockpit_lite/quantities/``; panels = the instruments of
``cockpit_lite.instruments.builtin()`` (the dashboard) and, grouped by their ``tab``, the TensorBoard tab's panels
(served by the plugin's ``/panels`` route, drawn by ``static/index.js``).
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

from cockpit_lite import instruments
from cockpit_lite.runlog import keys as runlog_keys
from cockpit_lite.presets import PRESETS
from cockpit_lite.instruments import tab_panels

ROOT = pathlib.Path(__file__).resolve().parents[2]
INDEX_JS = ROOT / "cockpit_lite" / "tensorboard" / "static" / "index.js"


def quantity_files():
    return sorted(p.stem for p in (ROOT / "cockpit_lite" / "quantities").glob("*.py")
                  if not p.stem.startswith("_") and p.stem != "base")


def test_quantity_registry_is_the_quantity_files():
    from cockpit_lite.quantities import REGISTRY, builtin_names

    files = quantity_files()
    assert list(runlog_keys.builtin_quantities()) == files
    assert builtin_names() == files
    assert set(files) <= set(REGISTRY)
    for name in files:
        assert REGISTRY[name].name == name and REGISTRY[name].__module__ == f"cockpit_lite.quantities.{name}"


def test_instrument_registry_is_the_instrument_files():
    files = sorted(p.stem for p in (ROOT / "instruments").glob("*.py") if not p.stem.startswith("_"))
    found = instruments.builtin()
    assert sorted(i.name for i in found) == files
    assert set(instruments.ORDER) <= set(files), set(instruments.ORDER) - set(files)
    assert [i.name for i in found][:len(instruments.ORDER)] == [n for n in instruments.ORDER if n in files]


def test_every_quantity_has_a_panel_or_says_why_not():
    read = {instruments.quantity_of(k) for i in instruments.builtin() for k in (*i.keys, *i.data_keys)}
    files = set(quantity_files())
    without = files - read
    assert without == set(instruments.PANEL_LESS), f"quantities with no instrument and not in PANEL_LESS: {without}"
    assert all(instruments.PANEL_LESS.values())
    # and no instrument reads a quantity that does not exist (a renamed quantity leaves no stale panel)
    assert read <= files, read - files


def test_presets_name_only_registered_quantities():
    files = set(quantity_files())
    for name, spec in PRESETS.items():
        assert set(spec) <= files, (name, set(spec) - files)


def test_synthetic_log_has_every_quantity(tmp_path):
    from cockpit_lite import load
    from cockpit_lite.testing import ALL, write_synthetic_log

    assert list(ALL) == quantity_files()
    write_synthetic_log(tmp_path, 12, hist_every=5, curvature_every=5)
    run = load(tmp_path)
    logged = {instruments.quantity_of(k) for k in run.keys()} | set(run.data_keys())
    assert set(ALL) <= logged, set(ALL) - logged


def test_tab_panels_cover_every_instrument_once_in_dashboard_order():
    found = instruments.builtin()
    panels = tab_panels(found)
    names = [n for p in panels for n in p["instruments"]]
    assert sorted(names) == sorted(i.name for i in found) and len(names) == len(set(names))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    groups = [instruments.GROUPS.index(p["group"]) for p in panels]
    assert groups == sorted(groups)
    by_name = {i.name: i for i in found}
    for p in panels:
        for n in p["instruments"]:
            assert (by_name[n].tab or n) == p["id"]
            assert set(by_name[n].keys) <= set(p["keys"])


def renderer_ids():
    js = INDEX_JS.read_text()
    block = re.search(r"const RENDERERS = \{(.*?)\n\};", js, re.S)
    assert block, "index.js has no RENDERERS table"
    return set(re.findall(r"^  '?([\w-]+)'?:", block.group(1), re.M))


def test_index_js_renders_only_registry_panels():
    ids = {p["id"] for p in tab_panels(instruments.builtin())}
    renderers = renderer_ids()
    assert renderers, "no renderer ids parsed from index.js"
    assert renderers <= ids, f"index.js draws panels no instrument has: {renderers - ids}"
    js = INDEX_JS.read_text()
    assert "getJSON('panels')" in js and "genericPanel(run, p)" in js


class _NewPanel(instruments.Instrument):
    """What a third party (or a new built-in) adds: one instrument, no frontend change."""
    name = "my_quantity"
    title = "My quantity"
    group = "curvature"
    keys = ("my_quantity",)
    description = "a quantity the tab has never heard of"


def test_panels_route_serves_the_registry_including_a_new_instrument(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider as mdp
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from werkzeug.test import Client

    from cockpit_lite.tensorboard.loader import CockpitLoader

    monkeypatch.setattr(instruments._registry, "third_party", lambda: [_NewPanel()])
    multiplexer = pem.EventMultiplexer()
    provider = mdp.MultiplexerDataProvider(multiplexer, str(tmp_path))
    context = base_plugin.TBContext(logdir=str(tmp_path), data_provider=provider, multiplexer=multiplexer, flags=None)
    client = Client(application.TensorBoardWSGI([CockpitLoader().load(context)], data_provider=provider))
    resp = client.get("/data/plugin/cockpit_lite/panels")
    assert resp.status_code == 200
    served = json.loads(resp.get_data(as_text=True))["panels"]
    assert served == tab_panels(instruments.builtin() + [_NewPanel()])
    new = [p for p in served if p["id"] == "my_quantity"]
    assert new and new[0]["keys"] == ["my_quantity"] and new[0]["id"] not in renderer_ids()


def test_summary_parts_are_one_list():
    from cockpit_lite.cli import _is_part
    from cockpit_lite.tensorboard.plugin import panel_key

    for part in runlog_keys.SUMMARY_PARTS:
        assert _is_part(f"hess_trace/{part}") and panel_key(f"hess_trace/{part}")
    for key in ("grad_norm/0.weight", "hess_trace/fc.bias"):
        assert not _is_part(key) and not panel_key(key)
