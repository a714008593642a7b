"""Norm, inner-product and orthogonality tests over steps (values above 1: batch too small)."""

from ._lines import LinesInstrument


class GradientTestsHistory(LinesInstrument):
    name = "gradient_tests_history"
    tab = "gradient-tests"
    title = "Gradient tests over steps"
    group = "gradients"
    keys = ("norm_test", "inner_test", "ortho_test")
    ylabel = "test value"
    threshold = (1.0, "θ = 1 (above: increase batch)")
    description = "Byrd et al. norm test, Bollapragada et al. inner-product and orthogonality tests."

    def label(self, key: str) -> str:
        return {"norm_test": "norm", "inner_test": "inner product", "ortho_test": "orthogonality"}[key]
