"""Hessian and GGN traces over steps, with the standard error band of stochastic estimates."""

import numpy as np

from ._draw import PALETTE, draw_line, finish, scale_y
from ._error_band import error_band, errors_at
from ._nan_note import nan_note
from . import Instrument


class Traces(Instrument):
    name = "traces"
    tab = "curvature"
    title = "Curvature traces"
    group = "curvature"
    keys = ("hess_trace", "hess_trace/stderr", "ggn_trace", "ggn_trace/stderr")
    kind = "lines"
    description = "tr(H) and tr(GGN): exact where the model allows, else Hutchinson-type estimates ± 1 s.e."

    def missing(self, run):
        if run.has_finite("hess_trace") or run.has_finite("ggn_trace"):
            return None
        from . import missing_reason

        return missing_reason(run, ["hess_trace", "ggn_trace"])

    def draw(self, ax, run) -> None:
        drawn = []
        for color, key in zip(PALETTE, ("hess_trace", "ggn_trace")):
            steps, values = run.series(key)
            if not steps.size:
                continue
            method = ""
            last = run.last_data(key)
            if last is not None and isinstance(last[1], dict):
                d = last[1]
                method = str(d.get("method", ""))
                if d.get("probes"):
                    method += f", {d['probes']} probes"
            label = key.replace("_trace", "") + " trace" + (f" ({method})" if method else "")
            draw_line(ax, steps, values, color=color, lw=1.2, label=label)
            error_band(ax, run, key, key + "/stderr", color=color, label=f"{key} ± 1 standard error")
            drawn.append(values)
        scale_y(ax, np.concatenate(drawn) if drawn else [])
        note_negative(ax, run, "hess_trace")
        ax.set_title(self.title)
        finish(ax, "trace", legend=True)
        nan_note(ax, run, ("hess_trace", "ggn_trace"))


def note_negative(ax, run, key: str, *, k_se: float = 2.0) -> int:
    """A Hessian trace below 0 is not an error: the loss curves down along some directions more than up
    along others (a non-convex region; the GGN trace, positive semi-definite, cannot do this). Said in
    the legend, with the count, and the zero line drawn.

    A step counts only where the sign is established: an exact value (``<key>/stderr`` 0 or not logged)
    below 0, or an estimate more than ``k_se`` standard errors below 0. An estimate within ``k_se`` s.e.
    of 0 (-1.4 +- 3.6), or one without a finite standard error, says nothing about the sign; those are
    counted apart. Returns the count of established negative steps."""
    steps, values = run.series(key)
    e = errors_at(steps, *run.series(key + "/stderr"), missing=0.0)  # not logged: exact
    below = np.isfinite(values) & (values < 0)
    exact = below & (e == 0)
    with np.errstate(invalid="ignore"):
        significant = below & np.isfinite(e) & (e > 0) & (values < -k_se * e)
    negative = int(np.sum(exact | significant))
    unsure = int(np.sum(below)) - negative
    if negative or unsure:
        ax.axhline(0, color="0.3", lw=0.7, ls=":")
    if negative:
        ax.plot([], [], ls="none", label=f"tr(H) < 0 on {negative} step(s): non-convex region "
                                          "(negative curvature dominates), not an error")
    if unsure:
        ax.plot([], [], ls="none", label=f"tr(H) < 0 within {k_se:g} s.e. of 0 on {unsure} step(s): sign not established")
    return negative
