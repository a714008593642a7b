"""Why a panel has nothing to draw: the quantity was not recorded, or only NaN with reasons."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ._run_view import RunView


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
