"""A base for instruments that draw one or more scalar series over steps."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from . import Instrument
from ._draw import PALETTE, finish, plot_series, scale_y
from ._nan_note import nan_note


class LinesInstrument(Instrument):
    """Draws every key of ``keys`` that the run has, one line each, over steps.

    ``threshold``: a horizontal reference line (value, label), e.g. a test's pass/fail level.
    """

    kind = "lines"
    ylabel: str = ""
    threshold: Optional[Tuple[float, str]] = None

    def draw(self, ax, run) -> None:
        drawn = []
        for i, key in enumerate(self.keys):
            values = plot_series(ax, run, key, label=self.label(key), color=PALETTE[i % len(PALETTE)])
            drawn.append(values)
        values = np.concatenate(drawn) if drawn else np.empty(0)
        if self.threshold is not None:
            level, text = self.threshold
            ax.axhline(level, color="k", ls="--", lw=0.8, label=text)
            values = np.append(values, level)
        scale_y(ax, values)
        ax.set_title(self.title)
        finish(ax, self.ylabel, legend=len(self.keys) > 1 or self.threshold is not None)
        nan_note(ax, run, self.keys)

    def label(self, key: str) -> str:
        return key
