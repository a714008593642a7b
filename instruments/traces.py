"""Hessian and GGN traces over steps, with the standard error band of stochastic estimates."""

import numpy as np

from ._draw import PALETTE, draw_line, finish, scale_y
from . import Instrument


class Traces(Instrument):
    name = "traces"
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
            err_steps, err = run.series(key + "/stderr")
            if err_steps.size and (np.nan_to_num(err) > 0).any() and len(err_steps) <= 5000:  # 0: exact
                at = np.isin(steps, err_steps)
                e = np.full_like(values, np.nan)
                e[at] = err[np.isin(err_steps, steps)]
                ax.fill_between(steps, values - e, values + e, color=color, alpha=0.2, lw=0,
                                label="± 1 standard error")
            drawn.append(values)
        scale_y(ax, np.concatenate(drawn) if drawn else [])
        ax.set_title(self.title)
        finish(ax, "trace", legend=True)
