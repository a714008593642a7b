"""The instrument base class and the vocabulary it uses (groups, kinds)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from ._reasons import missing_reason

if TYPE_CHECKING:  # pragma: no cover
    from ._run_view import RunView

#: dashboard sections, in display order
GROUPS: Tuple[str, ...] = ("step size", "gradients", "curvature", "performance", "cost")

KINDS = ("lines", "histogram", "histogram2d", "parabola", "scatter", "text")


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


