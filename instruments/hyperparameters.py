"""Learning rate of each parameter group over steps."""

from ._draw import PALETTE, finish, plot_series, scale_y
from ._lines import LinesInstrument

import numpy as np


class Hyperparameters(LinesInstrument):
    name = "hyperparameters"
    tab = "lr"
    title = "Learning rate"
    group = "step size"
    keys = ("lr",)
    ylabel = "learning rate"
    description = "Learning rate of each optimizer parameter group (schedulers included)."

    def draw(self, ax, run) -> None:
        groups = run.subkeys("lr")
        keys = groups or ["lr"]
        drawn = [plot_series(ax, run, k, label=k.split("/", 1)[-1] if groups else "lr", color=PALETTE[i % 8])
                 for i, k in enumerate(keys)]
        scale_y(ax, np.concatenate(drawn))
        ax.set_title(self.title)
        finish(ax, self.ylabel, legend=len(keys) > 1)
