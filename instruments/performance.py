"""Mini-batch loss over steps with a trailing moving average (a moving median when outliers would drag
an average off the axis; those are drawn on the axis edge and counted)."""


import numpy as np

from ._draw import ALL_COLOR, RECENT_COLOR, draw_line, finish, moving_average, scale_y
from ._moving import moving_median
from ._nan_note import nan_note
from ._tidy import mark_off_axis, robust_limits
from . import Instrument


class Performance(Instrument):
    name = "performance"
    tab = "loss"
    title = "Mini-batch loss"
    group = "performance"
    keys = ("loss",)
    kind = "lines"
    description = "Mini-batch training loss and its trailing moving average."

    def draw(self, ax, run) -> None:
        steps, values = run.series("loss")
        window = max(1, min(200, len(values) // 20))
        limits = robust_limits(values, q=0.5)
        shown = values if limits is None else np.where((values >= limits[0]) & (values <= limits[1]), values, np.nan)
        draw_line(ax, steps, shown, color=ALL_COLOR, lw=0.8, alpha=0.45, label="loss")
        if window > 1:
            if limits is None:
                draw_line(ax, steps, moving_average(values, window), color=RECENT_COLOR, lw=1.6,
                          label=f"moving average ({window} steps)")
            else:
                draw_line(ax, steps, moving_median(values, window), color=RECENT_COLOR, lw=1.6,
                          label=f"moving median ({window} steps)")
        if limits is None:
            scale_y(ax, values)
        else:
            mark_off_axis(ax, steps, values, max(limits[0], 0.0) if np.nanmin(shown) >= 0 else limits[0], limits[1])
        ax.set_title(self.title)
        finish(ax, "loss", legend=True)
        nan_note(ax, run, ("loss",))
