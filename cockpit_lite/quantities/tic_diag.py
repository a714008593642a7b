"""``tic_diag``: sum_j [(1/B) sum_i g_ij^2] / (c_j + 1e-7), c = Hessian diagonal (Thomas et al. 2020).

Only with the exact diagonal (BackPACK, cross-checked): otherwise NaN with the reason (curvature/tic.py).
Records ``tic_diag/stderr`` = 0 (exact) and, in the data, which curvature was used."""

from __future__ import annotations

from . import _curvature as curv
from . import _tic as tic
from .base import Quantity


class TICDiag(Quantity):
    name = "tic_diag"
    needs = frozenset({"layer_io", "model_inputs"})
    reads_theta = "all"  # the batch re-evaluated at theta_t (engine/param_versions.py)
    per_sample_stats = frozenset({"m2"})  # joins the step's shared per-layer pass (persample/plan.py)
    default_schedule = "log"
    description = "Takeuchi information criterion with the Hessian diagonal (exact via BackPACK, else NaN + reason)"

    def __init__(self, schedule=None, *, probes: int = 30, seed: int = 0):
        super().__init__(schedule)
        self.probes = int(probes)  # Hutchinson probes of tr(H) for tic_trace when no exact diagonal is available
        self.seed = seed  # probes of step t from (seed, t): the same in every process (rng.step_generator)
        # float64 diagonal: a float32 entry 2e-4 of the largest moved a 300-term sum by 2.3e-4 (tests/curvature/
        # test_unseen_curvature.py, ce_k_dimensional)
        self.exact = curv.ExactDiagonals(float64=True)

    def before_step(self, ctx):
        r = tic.compute(ctx, self.exact, self.probes, self.seed)
        if r.reason is not None:
            ctx.emit_nan(self.name, r.reason)
            return
        self.emit(ctx, r)

    def emit(self, ctx, r: "tic.TIC") -> None:
        if r.diag is None:
            ctx.emit_nan(self.name, f"{self.name} {r.diag_reason}")
            return
        ctx.emit(self.name, r.diag)
        ctx.emit(f"{self.name}/stderr", 0.0)
        # abs_terms: the scale of its float32 rounding error (curvature/tic.py)
        ctx.emit_data(self.name, {"curvature": r.curvature, "probes": r.probes, "abs_terms": r.abs_terms})
