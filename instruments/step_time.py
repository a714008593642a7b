"""Wall time of each step, the part cockpit-lite added, and the device time where measured; the title
gives the cockpit's share of the step time (``cockpit_lite/overhead.py``). A first step that is many
times slower (one-off set-up) is marked on the axis edge, not allowed to flatten every other step."""

import numpy as np

from ._draw import PALETTE, draw_line, finish
from ._lines import LinesInstrument
from ._tidy import mark_off_axis, robust_limits

LABELS = {"time": "wall", "time/device": "device (CUDA events)", "time/cockpit": "cockpit-lite overhead"}


class StepTime(LinesInstrument):
    name = "step_time"
    tab = "cost"
    title = "Time per step"
    group = "cost"
    keys = ("time", "time/device", "time/cockpit")
    ylabel = "seconds"
    description = ("Wall time of the step, GPU time between CUDA events, and cockpit-lite's own overhead; "
                   "the title gives the cockpit's share of the step time.")

    def label(self, key: str) -> str:
        return LABELS[key]

    def draw(self, ax, run) -> None:
        from cockpit_lite.overhead import run_share

        everything = []
        for i, key in enumerate(self.keys):
            steps, values = run.series(key)
            if not steps.size:
                continue
            draw_line(ax, steps, values, color=PALETTE[i], lw=1.0, label=self.label(key))
            everything.append((key, steps, values))
        all_values = np.concatenate([v for _, _, v in everything]) if everything else np.empty(0)
        limits = robust_limits(all_values, q=1.0)
        if limits is not None:
            for key, steps, values in everything:
                mark_off_axis(ax, steps, values, 0.0, limits[1], what=f"({self.label(key)})")
        else:
            ax.set_ylim(bottom=0)
        whole, recent, n = run_share(run)
        if n and np.isfinite(whole):  # the cost of the preset, in the legend (first tracked step left out)
            ax.plot([], [], ls="none", label=f"cockpit: {100 * whole:.0f}% of step time" + (
                f", recent {100 * recent:.0f}%" if abs(recent - whole) >= 0.05 else ""))
        ax.set_title(self.title)
        finish(ax, self.ylabel, legend=True)
