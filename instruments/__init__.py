"""Pluggable instruments: panels that read quantities from a run log and draw themselves.

An instrument is a small object with

* ``name``: a short identifier (``"grad_norm"``, ``"alpha_gauge"``), used by ``--instruments``;
* ``title``: the panel title;
* ``group``: what it diagnoses, one of :data:`GROUPS` (``"step size"``, ``"gradients"``,
  ``"curvature"``, ``"performance"``, ``"cost"``); the dashboard arranges panels by group;
* ``keys``: the log keys it reads (``"grad_norm"``, ``"alpha"``; see docs/record-keys.md);
* ``kind``: how it looks (``"lines"``, ``"histogram"``, ``"histogram2d"``, ``"parabola"``,
  ``"scatter"``), for views that do not use matplotlib (the TensorBoard tab);
* ``missing(run) -> str | None``: ``None`` when the run has something to draw, otherwise the reason
  (which quantity is absent and how to enable it, or the reasons logged with its NaN values);
* ``draw(ax, run)``: draw on a matplotlib ``Axes``;
* ``tab``: the TensorBoard tab's panel that shows it (default: its own panel, named like it);
  instruments with the same ``tab`` share one panel there (:func:`tab_panels`);
* ``describe() -> dict``: the JSON description (name, title, group, keys, kind, tab).

``run`` is a :class:`RunView`: the ``Run`` of :func:`cockpit_lite.load` restricted to a step
range, with the same read methods (``series``, ``data``, ``reasons``, ``keys``, ``header``).

Third-party instruments register through the entry-point group ``cockpit_lite.instruments``;
the object may be an ``Instrument`` subclass, an instance, or a function returning instances::

    [project.entry-points."cockpit_lite.instruments"]
    my_panel = "my_package.my_panel:MyPanel"

:func:`discover` returns the built-in instruments followed by the registered ones, and the
dashboard shows them without any change to this package (see examples/third_party_instrument).

Importing this package does not import matplotlib; drawing does.
"""

from __future__ import annotations

import operator
import warnings
from collections import Counter
from importlib import metadata
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

GROUP_ENTRY_POINTS = "cockpit_lite.instruments"

#: dashboard sections, in display order
GROUPS: Tuple[str, ...] = ("step size", "gradients", "curvature", "performance", "cost")

KINDS = ("lines", "histogram", "histogram2d", "parabola", "scatter", "text")

#: built-in quantities that no built-in instrument reads, and why (tests/test_registries.py checks that
#: every other quantity has a panel)
PANEL_LESS: Dict[str, str] = {
    "param_norm": "context for distance: drawn in the TensorBoard tab's distances panel, no dashboard panel",
}


class Instrument:
    """Base class: set the class attributes, override ``draw`` (and ``missing`` if needed).

    The default ``missing`` says the instrument has data when at least one of its ``keys`` has a
    finite value (scalar keys) or a structure (``data_keys``) in the run.
    """

    name: str = ""
    title: str = ""
    group: str = "gradients"
    keys: Tuple[str, ...] = ()
    #: keys read from the records' ``data`` part (structures such as histograms)
    data_keys: Tuple[str, ...] = ()
    kind: str = "lines"
    #: one line under the title in the TensorBoard tab / ``cockpit-lite instruments``
    description: str = ""
    #: the TensorBoard tab's panel that shows this instrument ("": a panel of its own, named like it)
    tab: str = ""

    def missing(self, run: "RunView") -> Optional[str]:
        if any(run.last_data(k) is not None for k in self.data_keys):
            return None
        scalar_keys = [k for k in self.keys if k not in self.data_keys]
        if any(run.has_finite(k) for k in scalar_keys):
            return None
        return missing_reason(run, list(self.data_keys) + scalar_keys)

    def draw(self, ax, run: "RunView") -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "title": self.title, "group": self.group, "keys": list(self.keys),
                "data_keys": list(self.data_keys), "kind": self.kind, "description": self.description,
                "tab": self.tab or self.name}

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"


# -- reading a run ------------------------------------------------------------------------------
def _to_float(table):
    """An object array of logged numbers ("NaN"/"Infinity" strings included) as float64."""
    import numpy as np

    try:
        return table.astype(np.float64)
    except (TypeError, ValueError):  # an unexpected string or null: the reader's own rule, one by one
        from cockpit_lite.runlog import decode_number

        return np.vectorize(decode_number, otypes=[np.float64])(table)


class RunView:
    """A ``Run`` restricted to steps ``[start, stop)``, with memoized reads.

    Instruments receive this instead of the ``Run``; it has the same read methods.
    """

    def __init__(self, run, start: Optional[int] = None, stop: Optional[int] = None, label: Optional[str] = None):
        self.run = run
        self.start = start
        self.stop = stop
        self.label = label or _run_label(run)
        self._series: Dict[str, Any] = {}
        self._data: Dict[str, Any] = {}
        self._keys: Optional[List[str]] = None

    @property
    def header(self) -> Dict[str, Any]:
        return getattr(self.run, "header", {}) or {}

    @property
    def skipped(self) -> List[Dict[str, Any]]:
        return [r for r in getattr(self.run, "skipped", []) if self._in_range(int(r.get("step", 0)))]

    def _in_range(self, step: int) -> bool:
        return (self.start is None or step >= self.start) and (self.stop is None or step < self.stop)

    def keys(self) -> List[str]:
        if self._keys is None:
            if hasattr(self.run, "keys"):
                self._keys = list(self.run.keys())
            else:
                seen: Dict[str, None] = {}
                for r in getattr(self.run, "records", None) or []:
                    seen.update(dict.fromkeys(r.get("values", ())))
                self._keys = list(seen)
        return self._keys

    def series(self, key: str):
        if key not in self._series:
            try:
                self._series[key] = self.run.series(key, start=self.start, stop=self.stop)
            except KeyError:  # a key in no record and of no quantity (Run.series): nothing to draw
                import numpy as np

                self._series[key] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
        return self._series[key]

    def prefetch(self, keys: Iterable[str], data_keys: Iterable[str] = ()) -> None:
        """Read several keys' series (and structures) in one pass over the records; ``series`` and
        ``data`` then return them. The dashboard does this for every key its instruments read,
        which is what keeps a 100,000-step log quick to plot.

        Records with the same set of keys (most of a run's records) are read together with one
        C-level ``itemgetter`` per record, and converted to numbers by numpy in one go. A
        ``cockpit_lite.Run`` keeps such columns itself (``Run.columns``): its series are taken from there.
        """
        import numpy as np

        wanted = [k for k in dict.fromkeys(keys) if k not in self._series]
        data_wanted = [k for k in dict.fromkeys(data_keys) if k not in self._data]
        if hasattr(self.run, "columns"):  # a Run: columns and structures without its records
            for k in wanted:  # its structures are read when drawn: a cached Run decodes those lines then
                self.series(k)
            return
        records = getattr(self.run, "records", None)
        if records is None or not (wanted or data_wanted):
            return
        start, stop = self.start, self.stop
        groups: Dict[tuple, Tuple[list, list]] = {}
        found_data: Dict[str, list] = {k: [] for k in data_wanted}
        for r in records:
            s = r["step"]
            if (start is not None and s < start) or (stop is not None and s >= stop):
                continue
            if data_wanted:
                d = r.get("data")
                if d:
                    for k in data_wanted:
                        if k in d:
                            found_data[k].append((s, d[k]))
            vals = r.get("values")
            if not vals or not wanted:
                continue
            signature = tuple(vals)
            group = groups.get(signature)
            if group is None:
                group = groups[signature] = ([], [])
            group[0].append(s)
            group[1].append(vals)
        self._data.update(found_data)
        chunks: Dict[str, List[Tuple[Any, Any]]] = {k: [] for k in wanted}
        for signature, (steps, rows) in groups.items():
            present = [k for k in wanted if k in rows[0]]
            if not present:
                continue
            getter = operator.itemgetter(*present)
            table = np.array([getter(v) for v in rows] if len(present) > 1 else [(getter(v),) for v in rows],
                             dtype=object).reshape(len(rows), len(present))
            numbers = _to_float(table)
            steps_arr = np.asarray(steps, dtype=np.int64)
            for j, k in enumerate(present):
                chunks[k].append((steps_arr, numbers[:, j]))
        for k in wanted:
            parts = chunks[k]
            if not parts:
                self._series[k] = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64))
            elif len(parts) == 1:
                self._series[k] = parts[0]
            else:
                steps_all = np.concatenate([p[0] for p in parts])
                order = np.argsort(steps_all, kind="stable")
                self._series[k] = (steps_all[order], np.concatenate([p[1] for p in parts])[order])

    def data(self, key: str) -> List[Tuple[int, Any]]:
        if key not in self._data:
            self._data[key] = [(s, d) for s, d in self.run.data(key) if self._in_range(s)]
        return self._data[key]

    def reasons(self, key: str) -> Dict[int, str]:
        return {s: r for s, r in self.run.reasons(key).items() if self._in_range(s)}

    def data_field(self, key: str, name: str):
        """``(steps, values)`` of a numeric entry of ``key``'s structures in range (``energy``'s
        ``steps``): a ``cockpit_lite.Run`` read from its cache answers without decoding them."""
        import numpy as np

        if key in self._data or not hasattr(self.run, "data_field"):
            from cockpit_lite.runlog import _entry_column

            return _entry_column(self.data(key), name)
        steps, values = self.run.data_field(key, name)
        keep = np.ones(len(steps), dtype=bool)
        if self.start is not None:
            keep &= steps >= self.start
        if self.stop is not None:
            keep &= steps < self.stop
        return steps[keep], values[keep]

    def last_data(self, key: str) -> Optional[Tuple[int, Any]]:
        """``(step, structure)`` of the last step in range that holds ``key`` (None if none)."""
        if key not in self._data and hasattr(self.run, "last_data"):
            last = self.run.last_data(key)
            if last is None or self._in_range(last[0]):
                return last
        found = self.data(key)
        return found[-1] if found else None

    def has_finite(self, key: str) -> bool:
        import numpy as np

        _, values = self.series(key)
        return bool(values.size and np.isfinite(values).any())

    def subkeys(self, prefix: str) -> List[str]:
        """Keys ``prefix/<part>`` in the run (per-parameter values, groups), in log order."""
        return [k for k in self.keys() if k.startswith(prefix + "/")]


def _run_label(run) -> str:
    logdir = getattr(run, "logdir", None)
    return getattr(logdir, "name", None) or str(logdir or "run")


def as_view(run, start=None, stop=None) -> RunView:
    return run if isinstance(run, RunView) else RunView(run, start, stop)


# -- "no data" reasons --------------------------------------------------------------------------
def no_records(run) -> bool:
    """``run`` has no step records yet; a ``cockpit_lite.Run`` is asked its length, which does not
    build the records of a run read from its cache."""
    if hasattr(type(run), "records"):  # a property (hasattr on the run itself would build them)
        return len(run) == 0
    records = getattr(run, "records", None)
    return records is not None and not records


def quantity_of(key: str) -> str:
    """The quantity that writes ``key`` (``"hess_trace/stderr"`` -> ``"hess_trace"``)."""
    return key.split("/", 1)[0]


def enable_hint(quantity: str) -> str:
    """How to make ``watch`` record ``quantity``."""
    smallest = None
    try:
        from cockpit_lite.presets import PRESETS

        for preset in ("default", "economy", "business", "full"):
            if quantity in PRESETS.get(preset, {}):
                smallest = preset
                break
    except Exception:  # the hint is a courtesy; never fail a plot for it
        pass
    how = f"quantities=[..., {quantity!r}]"
    if smallest is not None:
        how = f"quantities={smallest!r} or {how}"
    return f"enable it with watch(..., {how})"


def missing_reason(run: RunView, keys: Sequence[str]) -> str:
    """Why none of ``keys`` has data: the quantity was not recorded, or only NaN with reasons."""
    if no_records(run.run):
        return "the log has no step records yet"
    logged = [k for k in keys if run.series(k)[0].size]
    if logged:
        for k in logged:  # the first key with logged reasons speaks for its quantity
            counts = Counter(run.reasons(k).values())
            if counts:
                reason, n = counts.most_common(1)[0]
                more = f" (+{len(counts) - 1} other reasons)" if len(counts) > 1 else ""
                return f"{k} is NaN on every step ({n}x): {reason}{more}"
        return f"{logged[0]} is logged but not finite on any step in range"
    quantities = list(dict.fromkeys(quantity_of(k) for k in keys))
    first = quantities[0] if quantities else "?"
    names = " / ".join(quantities)
    if run.start is not None or run.stop is not None:
        in_log = any(run.run.series(k)[0].size for k in keys)
        if in_log:
            return f"{names} has no values in the chosen step range"
    return f"{names} not in this log: {enable_hint(first)}"


# -- discovery ----------------------------------------------------------------------------------
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

    found = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    rank = {name: n for n, name in enumerate(ORDER)}
    return sorted(found, key=lambda name: (rank.get(name, len(rank)), name))


def builtin() -> List[Instrument]:
    """The instruments shipped with cockpit-lite, in dashboard order: one per module of this package."""
    import importlib

    out = []
    for name in builtin_modules():
        module = importlib.import_module(f"{__name__}.{name}")
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

    return _tab_panels(found)


def downsample(steps, values, max_points: Optional[int] = None):
    """Reduce a long series for display (min/max per bucket, spikes kept); see ``_draw.downsample``."""
    from ._draw import MAX_POINTS, downsample as _downsample

    return _downsample(steps, values, max_points or MAX_POINTS)


__all__ = ["Instrument", "RunView", "downsample", "GROUPS", "KINDS", "PANEL_LESS", "GROUP_ENTRY_POINTS", "builtin", "third_party",
           "discover", "select", "tab_panels", "builtin_modules", "ORDER", "as_view", "missing_reason", "enable_hint", "quantity_of"]
