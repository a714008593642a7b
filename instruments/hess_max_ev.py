"""Largest Hessian eigenvalue over steps; steps where the eigensolver did not converge are marked."""

import numpy as np

from ._lines import LinesInstrument


class HessMaxEv(LinesInstrument):
    name = "hess_max_ev"
    title = "Largest Hessian eigenvalue"
    group = "curvature"
    keys = ("hess_max_ev",)
    ylabel = "λ_max"
    description = "Top eigenvalue of the mini-batch loss Hessian (Lanczos); x marks a non-converged estimate."

    def draw(self, ax, run) -> None:
        super().draw(ax, run)
        at, converged = run.data_field("hess_max_ev", "converged")  # 0/1 where the structure says
        unconverged = at[converged == 0]
        if unconverged.size:
            steps, values = run.series("hess_max_ev")
            mask = np.isin(steps, unconverged)
            ax.plot(steps[mask], values[mask], "x", color="#d62728", ms=6,
                    label=f"not converged ({int(mask.sum())})")
            ax.legend(fontsize="small", loc="best", framealpha=0.8)
