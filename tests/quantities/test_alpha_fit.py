"""The pure alpha fit (cockpit_lite.alpha_fit) against closed forms and an independent solver."""

import math
from fractions import Fraction

import numpy as np
import pytest

from cockpit_lite.alpha_fit import fit_alpha


def exact_quadratic_observations(h, m, t, c=0.3):
    """f(tau) = h/2 (tau - m)^2 + c observed without error at 0 and t: (f0, f1, df0, df1)."""
    f = lambda tau: 0.5 * h * (tau - m) ** 2 + c
    df = lambda tau: h * (tau - m)
    return f(0.0), f(t), df(0.0), df(t)


@pytest.mark.parametrize("h", [0.5, 2.0, 40.0])
@pytest.mark.parametrize("variances", [(0.1, 0.2, 0.3, 0.4), (0.0, 0.0, 0.0, 0.0), (1.0, 0.0, 1e-3, 5.0)])
def test_quadratic_closed_form(h, variances):
    m = 0.7  # distance from the start to the minimum along the update
    for t, expected in [(m, 0.0), (2 * m, 1.0), (0.5 * m, -0.5), (3 * m, 2.0)]:
        f0, f1, df0, df1 = exact_quadratic_observations(h, m, t)
        fit = fit_alpha(t, f0, f1, df0, df1, *variances)
        assert fit.case == "fit"
        assert fit.alpha == pytest.approx(expected, abs=1e-7)
        # the fit recovers the parabola itself: w = (f(0), -h m, h/2)
        assert fit.w == pytest.approx((0.5 * h * m * m + 0.3, -h * m, 0.5 * h), rel=1e-7)


def test_no_step_is_minus_one():
    f0, _, df0, _ = exact_quadratic_observations(1.0, 0.7, 0.0)
    fit = fit_alpha(0.0, f0, f0, df0, df0, 0.1, 0.1, 0.1, 0.1)
    assert fit.alpha == -1.0 and fit.case == "no_step" and "t = 0" in fit.reason


def test_concave_fit_is_minus_one():
    # f(tau) = 1 - tau^2 observed exactly: still going downhill, w2 < 0
    t = 0.5
    fit = fit_alpha(t, 1.0, 1 - t * t, 0.0, -2 * t, 0.1, 0.1, 0.1, 0.1)
    assert fit.alpha == -1.0 and fit.case == "not_convex"
    assert fit.w[2] == pytest.approx(-1.0)


@pytest.mark.parametrize("bad", [("f1", math.nan), ("var_df0", math.inf), ("t", math.nan), ("df0", -math.inf)])
def test_non_finite_inputs_give_nan_with_reason(bad):
    args = dict(t=0.5, f0=1.0, f1=0.8, df0=-1.0, df1=0.2, var_f0=0.1, var_f1=0.1, var_df0=0.1, var_df1=0.1)
    args[bad[0]] = bad[1]
    fit = fit_alpha(**args)
    assert math.isnan(fit.alpha) and fit.case == "invalid" and bad[0] in fit.reason


def test_negative_variance_gives_nan_with_reason():
    fit = fit_alpha(0.5, 1.0, 0.8, -1.0, 0.2, -0.1, 0.1, 0.1, 0.1)
    assert math.isnan(fit.alpha) and "var_f0" in fit.reason


def independent_alpha(t, fs, dfs, variances):
    """Weighted least squares written out with exact rational arithmetic (no numpy solver)."""
    t = Fraction(t)
    v = [Fraction(x) if x != 0 else Fraction(1, 10 ** 10) for x in variances]
    rows = [[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]]
    y = [Fraction(x) for x in list(fs) + list(dfs)]
    a = [[sum(rows[k][i] * rows[k][j] / v[k] for k in range(4)) for j in range(3)] for i in range(3)]
    b = [sum(rows[k][i] * y[k] / v[k] for k in range(4)) for i in range(3)]
    m = [a[i] + [b[i]] for i in range(3)]
    for i in range(3):  # Gauss-Jordan, exact
        for r in range(3):
            if r != i:
                factor = m[r][i] / m[i][i]
                m[r] = [x - factor * z for x, z in zip(m[r], m[i])]
    w = [m[i][3] / m[i][i] for i in range(3)]
    if w[2] <= 0:
        return -1.0, [float(x) for x in w]
    return float(2 * t / (-w[1] / w[2]) - 1), [float(x) for x in w]


def test_random_inputs_match_exact_weighted_least_squares():
    rng = np.random.default_rng(0)
    for i in range(200):
        t = float(rng.uniform(1e-3, 2.0))
        fs = rng.normal(1.0, 0.5, 2).tolist()
        dfs = rng.normal(0.0, 1.0, 2).tolist()
        variances = rng.uniform(0.0, 1.0, 4).tolist()
        if i % 5 == 0:
            variances[i % 4] = 0.0  # Cockpit's zero-variance substitute 1e-10
        expected, w = independent_alpha(t, fs, dfs, variances)
        fit = fit_alpha(t, fs[0], fs[1], dfs[0], dfs[1], *variances)
        assert fit.alpha == pytest.approx(expected, rel=1e-8, abs=1e-8)
        assert fit.w == pytest.approx(w, rel=1e-7, abs=1e-9)


def test_cockpit_recorded_values():
    """Values Cockpit 1.0.2's own _fit_quadratic/_get_alpha returned for these inputs (run once, by hand)."""
    cases = [
        ((0.5, 1.0, 0.0, -2.0, 0.0, 0.0, 0.0, 0.0, 0.0), -0.02857142857142847),
        ((0.5, 1.0, 1.5, 1.0, 2.0, 0.1, 0.1, 0.1, 0.1), -2.0303030303030303),
        ((0.5, 1.0, 0.5, -1.0, -1.5, 0.1, 0.1, 0.1, 0.1), -1.0),
        ((0.0, 1.0, 1.0, -1.0, -1.0, 0.1, 0.1, 0.1, 0.1), -1.0),
    ]
    for args, cockpit_alpha in cases:
        assert fit_alpha(*args).alpha == pytest.approx(cockpit_alpha, rel=1e-9, abs=1e-12)
