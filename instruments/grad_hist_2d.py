"""Joint histogram of (individual gradient element, parameter value) at the latest logged step."""

import numpy as np

from . import Instrument


class GradHist2d(Instrument):
    name = "grad_hist_2d"
    tab = "histograms"
    title = "Gradient element vs parameter value"
    group = "gradients"
    keys = ("grad_hist_2d",)
    data_keys = ("grad_hist_2d",)
    kind = "histogram2d"
    description = "Joint histogram of individual gradient elements B·g_ij and parameter values θ_j."

    def draw(self, ax, run) -> None:
        from matplotlib.colors import LogNorm

        step, h = run.last_data("grad_hist_2d")
        xe = np.asarray(h["x_edges"], dtype=np.float64)
        ye = np.asarray(h["y_edges"], dtype=np.float64)
        counts = np.asarray(h["counts"], dtype=np.float64)
        nx, ny = len(xe) - 1, len(ye) - 1
        if counts.shape == (ny, nx) and nx != ny:
            counts = counts.T
        if counts.shape != (nx, ny):
            raise ValueError(f"grad_hist_2d: counts of shape {counts.shape} do not fit {nx}x{ny} bins")
        shown = np.where(counts > 0, counts, np.nan)  # empty bins stay white
        vmax = np.nanmax(shown) if np.isfinite(shown).any() else 1.0
        mesh = ax.pcolormesh(xe, ye, shown.T, cmap="viridis", norm=LogNorm(vmin=1, vmax=max(vmax, 1.0)))
        bar = ax.figure.colorbar(mesh, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label("count", fontsize="small")
        bar.ax.tick_params(labelsize="x-small")
        ax.set_title(f"{self.title} (step {step})")
        ax.set_xlabel(f"gradient element ({str(h.get('x', 'B*g_ij')).replace('*', '·')})")
        ax.set_ylabel(f"parameter value ({str(h.get('y', 'theta_j')).replace('theta', 'θ')})")
