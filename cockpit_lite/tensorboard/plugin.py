"""The cockpit as a TensorBoard tab: a dynamic plugin with an ES-module frontend.

TensorBoard finds it through the ``tensorboard_plugins`` entry point (``loader.CockpitLoader``).
All data is read through ``context.data_provider``, so it works with the Rust data server (the
default) and with ``--load_fast=false``. Routes, under ``/data/plugin/cockpit_lite``:

* ``/static/<file>``: the frontend (``static/index.js``); no path traversal, no subfolders;
* ``/runs``: the runs that hold cockpit data, with their last step;
* ``/panels``: the tab's panels, from the instrument registry (``cockpit_lite.instruments.tab_panels()``): built-in
  and third-party instruments appear here and in the dashboard alike;
* ``/run?run=<name>``: one run's panels: cockpit scalars (``cockpit/<key>``), the last document of
  every ``data/<key>`` tag, NaN reasons, flags and events.

A TensorBoard without cockpit data pays one "list this plugin's tags" call (``is_active``); no
route is called unless the tab is opened.
"""

from __future__ import annotations

import json
import mimetypes
import os
import re
from typing import Any, Dict, List, Optional

from werkzeug import wrappers

from tensorboard import errors, plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin

from ..runlog import encode_number
from ..runlog.keys import is_summary_part
from .names import PLUGIN_NAME, SCALAR_PREFIX

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_STATIC_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(js|css|svg)$")
_MIME = {"js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}

MAX_SCALARS = 5000  # points per scalar series sent to the page (downsampled by the data provider)
MAX_TENSORS = 1000
MAX_REASON_STEPS = 50  # most recent steps with reasons, per quantity
MAX_EVENTS = 200


def panel_key(key: str) -> bool:
    """Whether a run-log key is drawn in a panel (totals and their named parts, ``runlog.keys.SUMMARY_PARTS``;
    not per-parameter values)."""
    return "/" not in key or is_summary_part(key)


def safe_static_name(name: str) -> Optional[str]:
    """The file in ``static/`` that ``name`` names, or None for anything but a plain file name.

    ``name`` is the path after ``/static/`` as the server decoded it; encoded slashes (%2F, %5C),
    backslashes, ``..``, absolute paths and sub-folders are all refused.
    """
    if not name or "/" in name or "\\" in name or "%" in name or ".." in name or "\x00" in name:
        return None
    if not _STATIC_NAME.match(name):
        return None
    path = os.path.join(STATIC_DIR, name)
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(STATIC_DIR) or not os.path.isfile(real):
        return None
    return real


def _decode_json_tensor(value) -> Any:
    """A 0-d string tensor (numpy) holding one JSON document -> the document (None if unreadable)."""
    try:
        raw = value.item() if hasattr(value, "item") else value
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8")
        return json.loads(raw)
    except (ValueError, TypeError, AttributeError):
        return None


class CockpitPlugin(base_plugin.TBPlugin):
    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext):
        self._data_provider = context.data_provider

    # -- TBPlugin -------------------------------------------------------------------------------
    def get_plugin_apps(self):
        return {
            "/static/*": self._serve_static,
            "/runs": self._serve_runs,
            "/panels": self._serve_panels,
            "/run": self._serve_run,
        }

    def is_active(self) -> bool:
        """True when some run holds this plugin's tags (one listing call; False on any error)."""
        if self._data_provider is None:
            return False
        try:
            return bool(self._data_provider.list_tensors(
                _empty_context(), experiment_id="", plugin_name=PLUGIN_NAME))
        except Exception:
            return False

    def frontend_metadata(self):
        return base_plugin.FrontendMetadata(es_module_path="/static/index.js", tab_name="Cockpit")

    def data_plugin_names(self):
        return (PLUGIN_NAME,)

    # -- routes ---------------------------------------------------------------------------------
    @wrappers.Request.application
    def _serve_static(self, request):
        prefix = f"/data/plugin/{PLUGIN_NAME}/static/"
        raw_path = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or ""
        path = request.path
        at = path.find(prefix)
        name = path[at + len(prefix):] if at >= 0 else ""
        raw_name = raw_path.split("?", 1)[0]
        if "%" in raw_name.rsplit("/static/", 1)[-1]:
            name = ""  # an encoded character in the file name (%2F, %5C, %2E...): refuse
        real = safe_static_name(name)
        if real is None:
            return http_util.Respond(request, "not found", "text/plain", code=404)
        with open(real, "rb") as fh:
            body = fh.read()
        ext = real.rsplit(".", 1)[-1]
        return http_util.Respond(request, body, _MIME.get(ext) or mimetypes.guess_type(real)[0] or "text/plain")

    @wrappers.Request.application
    def _serve_runs(self, request):
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        tensors = self._data_provider.list_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME)
        scalars = self._data_provider.list_scalars(
            ctx, experiment_id=eid, plugin_name="scalars", run_tag_filter=provider.RunTagFilter(runs=sorted(tensors))
        ) if tensors else {}
        runs = []
        for run in sorted(tensors):
            series = [ts for tag, ts in tensors[run].items() if tag not in ("events", "meta")]
            series += [ts for tag, ts in scalars.get(run, {}).items() if tag.startswith(SCALAR_PREFIX)]
            runs.append({
                "run": run,
                "max_step": max((ts.max_step for ts in series), default=None),
                "max_wall_time": max((ts.max_wall_time for ts in series + list(tensors[run].values())), default=None),
                "scalar_tags": sum(1 for tag in scalars.get(run, {}) if tag.startswith(SCALAR_PREFIX)),
            })
        return http_util.Respond(request, {"runs": runs}, "application/json")

    @wrappers.Request.application
    def _serve_panels(self, request):
        try:
            from cockpit_lite.instruments import tab_panels

            body = {"panels": tab_panels()}
        except Exception as err:  # a broken registry: the tab says so instead of drawing nothing
            return http_util.Respond(request, {"error": f"{type(err).__name__}: {err}"}, "application/json", code=500)
        return http_util.Respond(request, body, "application/json")

    @wrappers.Request.application
    def _serve_run(self, request):
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        run = request.args.get("run")
        if not run:
            return http_util.Respond(request, {"error": "the 'run' argument is missing"}, "application/json", code=400)
        try:
            body = self.run_panels(ctx, eid, run)
        except errors.NotFoundError as err:
            return http_util.Respond(request, {"error": str(err)}, "application/json", code=404)
        return http_util.Respond(request, body, "application/json")

    # -- reading --------------------------------------------------------------------------------
    def run_panels(self, ctx, eid: str, run: str) -> Dict[str, Any]:
        dp = self._data_provider
        tensor_tags = dp.list_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME,
                                      run_tag_filter=provider.RunTagFilter(runs=[run])).get(run)
        scalar_tags = dp.list_scalars(ctx, experiment_id=eid, plugin_name="scalars",
                                      run_tag_filter=provider.RunTagFilter(runs=[run])).get(run, {})
        wanted = sorted(t for t in scalar_tags if t.startswith(SCALAR_PREFIX) and panel_key(t[len(SCALAR_PREFIX):]))
        if not tensor_tags and not wanted:
            raise errors.NotFoundError(f"no cockpit data for run {run!r}")
        scalars: Dict[str, Dict[str, List]] = {}
        if wanted:
            read = dp.read_scalars(ctx, experiment_id=eid, plugin_name="scalars", downsample=MAX_SCALARS,
                                   run_tag_filter=provider.RunTagFilter(runs=[run], tags=wanted)).get(run, {})
            for tag, points in read.items():
                by_step = {p.step: p.value for p in points}  # a rewritten step keeps its last value
                steps = sorted(by_step)
                scalars[tag[len(SCALAR_PREFIX):]] = {"steps": steps, "values": [encode_number(by_step[s]) for s in steps]}
        data: Dict[str, Dict[str, Any]] = {}
        reasons: Dict[str, List[Dict[str, Any]]] = {}
        flags: List[Dict[str, Any]] = []
        events: List[Any] = []
        overflow: List[Dict[str, Any]] = []
        reason_counts: Dict[str, int] = {}  # key -> steps with a reason (all steps read)
        reason_counts_partial: List[str] = []  # quantities whose reasons were downsampled (counts are at least)
        if tensor_tags:
            read = dp.read_tensors(ctx, experiment_id=eid, plugin_name=PLUGIN_NAME, downsample=MAX_TENSORS,
                                   run_tag_filter=provider.RunTagFilter(runs=[run], tags=sorted(tensor_tags))).get(run, {})
            for tag, datums in read.items():
                docs = _last_per_step(datums)
                if tag.startswith("data/") and docs:
                    step = max(docs)
                    data[tag[len("data/"):]] = {"step": step, "value": docs[step], "steps": len(docs)}
                    if _unavailable_histogram(docs[step]):  # the tab draws the last one that has bins
                        valid = [s for s in docs if not _unavailable_histogram(docs[s])]
                        if valid:
                            data[tag[len("data/"):]]["last_valid"] = {"step": max(valid), "value": docs[max(valid)]}
                elif tag.startswith("reasons/"):
                    reasons[tag[len("reasons/"):]] = [{"step": s, "reasons": docs[s]} for s in sorted(docs)][-MAX_REASON_STEPS:]
                    for doc in docs.values():  # every step read, not only the most recent MAX_REASON_STEPS
                        for key in doc if isinstance(doc, dict) else ():
                            reason_counts[key] = reason_counts.get(key, 0) + 1
                    if len(datums) >= MAX_TENSORS:
                        reason_counts_partial.append(tag[len("reasons/"):])
                elif tag == "overflow":
                    overflow = [{"step": s, "values": docs[s]} for s in sorted(docs)]
                elif tag == "flags":
                    flags = [{"step": s, "flags": docs[s]} for s in sorted(docs)]
                elif tag == "events":  # (the "meta" tag only marks a cockpit run)
                    events = [docs[s] for s in sorted(docs)][-MAX_EVENTS:]
        return {"run": run, "scalars": scalars, "data": data, "reasons": reasons, "flags": flags, "events": events,
                "reason_counts": reason_counts, "reason_counts_partial": reason_counts_partial, "overflow": overflow}


def _unavailable_histogram(doc) -> bool:
    """The logged 'no histogram on this step' structure: ``{"edges": null, "counts": null, "reason": ...}``."""
    return isinstance(doc, dict) and "edges" in doc and (doc.get("edges") is None or doc.get("counts") is None)


def _last_per_step(datums) -> Dict[int, Any]:
    docs: Dict[int, Any] = {}
    for d in datums:  # in file order: the last document of a step is the complete one
        doc = _decode_json_tensor(d.numpy)
        if doc is not None:
            docs[d.step] = doc
    return docs


def _empty_context():
    from tensorboard import context

    return context.RequestContext()
