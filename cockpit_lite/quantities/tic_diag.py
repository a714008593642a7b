"""``tic_diag``: sum_j [(1/B) sum_i g_ij^2] / (c_j + 1e-7), c = Hessian diagonal (Thomas et al. 2020)."""

from __future__ import annotations


from ..curvature import step as curv
from ..curvature import tic
from ..rng import step_generator
from .base import Quantity


class TICDiag(Quantity):
    name = "tic_diag"
    needs = frozenset({"layer_io", "model_inputs"})
    default_schedule = "log"
    description = "Takeuchi information criterion with the Hessian diagonal (exact via BackPACK, else estimated)"
    field = "diag"

    def __init__(self, schedule=None, *, probes: int = 10, seed: int = 0):
        super().__init__(schedule)
        self.probes = int(probes)
        self.seed = seed  # probes of step t from (seed, t): the same in every process (rng.step_generator)
        self.exact = curv.ExactDiagonals()

    def before_step(self, ctx):
        r = tic.compute(ctx, self.exact, self.probes, step_generator(self.seed, ctx.step))
        if r.reason is not None:
            ctx.emit_nan(self.name, r.reason)
            return
        ctx.emit(self.name, getattr(r, self.field))
        data = {"curvature": r.curvature, "probes": r.probes}
        if self.field == "diag":  # the scale of its float32 rounding error (curvature/tic.py)
            data["abs_terms"] = r.abs_terms
        ctx.emit_data(self.name, data)
