"""Largest Hessian eigenvalue over steps; steps where the eigensolver did not converge are marked, and the
Lanczos residual bound (an eigenvalue lies within it) is shaded where it is visible."""

import numpy as np

from ._draw import PALETTE
from ._error_band import error_band
from ._lines import LinesInstrument
from ._tidy import legend_above_data


class HessMaxEv(LinesInstrument):
    name = "hess_max_ev"
    tab = "curvature"
    title = "Largest Hessian eigenvalue"
    group = "curvature"
    keys = ("hess_max_ev",)
    ylabel = "λ_max"
    description = ("Top eigenvalue of the mini-batch loss Hessian (Lanczos); x marks a non-converged estimate, "
                   "the band its residual bound.")

    def draw(self, ax, run) -> None:
        super().draw(ax, run)
        banded = error_band(ax, run, "hess_max_ev", "hess_max_ev/error_bound", color=PALETTE[0],
                            label="± residual bound")
        at, converged = run.data_field("hess_max_ev", "converged")  # 0/1 where the structure says
        unconverged = at[converged == 0]
        if unconverged.size:
            steps, values = run.series("hess_max_ev")
            mask = np.isin(steps, unconverged)
            ax.plot(steps[mask], values[mask], "x", color="#d62728", ms=6,
                    label=f"not converged ({int(mask.sum())})")
        if banded or unconverged.size:
            legend_above_data(ax)
