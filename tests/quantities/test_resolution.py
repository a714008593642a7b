"""The gradient tests where float32 does not resolve the mean gradient (quantities/_resolution.py): NaN with
the reason, never a value off by percents; resolved cases keep their values (float64 brute force)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.quantities import _resolution, inner_test as inner_test_quantity
from reference import flat, inner_test, norm_test, ortho_test, per_sample_grads_bruteforce
from sequence_truth import per_sequence_grads, watched_step

TESTS = {"norm_test": norm_test, "inner_test": inner_test, "ortho_test": ortho_test}


def _fitted(iters: int, dtype=torch.float32, n: int = 64, d: int = 20):
    """Linear least squares on noisy targets, trained by full-batch GD (unwatched) for ``iters`` steps: at the
    optimum the mean gradient vanishes while each sample's stays ~ its residual."""
    torch.manual_seed(0)
    X = torch.randn(n, d, dtype=dtype)
    Y = X @ torch.randn(d, 3, dtype=dtype) + 0.1 * torch.randn(n, 3, dtype=dtype)
    model = nn.Linear(d, 3).to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(iters):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
    return model, opt, X, Y


def _watched_step(model, opt, X, Y, logdir):
    ref = per_sample_grads_bruteforce(copy.deepcopy(model).double(), nn.MSELoss(reduction="none"), X.double(), Y.double())
    crit = nn.MSELoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities={k: "every" for k in TESTS}):
        opt.zero_grad()
        crit(model(X), Y).backward()
        opt.step()
    return cockpit_lite.load(logdir), flat(ref)


def test_unresolved_mean_gradient_is_nan_with_the_reason(tmp_path):
    model, opt, X, Y = _fitted(3000)
    run, G = _watched_step(model, opt, X, Y, str(tmp_path))
    g = G.mean(0)
    rho = float((G.pow(2).sum(1).mean() / g.pow(2).sum()).sqrt())
    assert rho * torch.finfo(torch.float32).eps > _resolution.MAX_REL  # the premise: g is ~1e5 below the samples'
    for key in TESTS:
        value = dict(zip(*run.series(key)))[0]
        assert np.isnan(value), (key, value)
        assert "float32" in run.reasons(key)[0] and "times smaller" in run.reasons(key)[0]
        for name in ("weight", "bias"):
            assert np.isnan(dict(zip(*run.series(f"{key}/{name}")))[0])


def test_float64_is_judged_with_its_own_resolution(tmp_path):
    """120 steps: resolved in float64 (exact to 1e-10); 3000: g ~1e-14 of the samples', unresolved even there."""
    model, opt, X, Y = _fitted(120, dtype=torch.float64)
    run, G = _watched_step(model, opt, X, Y, str(tmp_path / "a"))
    for key, ref in TESTS.items():
        assert dict(zip(*run.series(key)))[0] == pytest.approx(ref(G), rel=1e-10), key
    model, opt, X, Y = _fitted(3000, dtype=torch.float64)
    run, G = _watched_step(model, opt, X, Y, str(tmp_path / "b"))
    assert np.isnan(dict(zip(*run.series("norm_test")))[0])
    assert "float64" in run.reasons("norm_test")[0]


SENSITIVITY = {"norm_test": 1.0, "inner_test": inner_test_quantity.SENSITIVITY, "ortho_test": 1.0}


@pytest.mark.parametrize("iters", [10, 120])
def test_resolved_steps_keep_their_values(tmp_path, iters):
    """Early (rho ~ 7) and near the optimum (rho ~ 540): finite and within twice the error the judge assumes
    (sensitivity * eps * rho, at least 1e-4) of float64. At rho 540 the inner test is 2.2 eps * rho off on an
    AMD EPYC, 1.1 on Intel: the BLAS's summation order decides, the judge's sensitivity covers both."""
    model, opt, X, Y = _fitted(iters)
    run, G = _watched_step(model, opt, X, Y, str(tmp_path))
    g = G.mean(0)
    rho = float((G.pow(2).sum(1).mean() / g.pow(2).sum()).sqrt())
    eps = float(torch.finfo(torch.float32).eps)
    for key, ref in TESTS.items():
        rel = max(1e-4, 2 * SENSITIVITY[key] * eps * rho)
        assert dict(zip(*run.series(key)))[0] == pytest.approx(ref(G), rel=rel), key


def test_judge_thresholds():
    eps = float(torch.finfo(torch.float32).eps)
    rho_max = _resolution.MAX_REL / eps
    n = 8
    g = 1.0
    assert _resolution._judge(eps, (0.99 * rho_max) ** 2 * n * g, g, n, "") is None
    assert "times smaller" in _resolution._judge(eps, (1.01 * rho_max) ** 2 * n * g, g, n, " of 'w'")
    assert _resolution._judge(eps, 1.0, 0.0, n, "") is None  # a zero gradient: the tests' own reason
    assert _resolution._judge(eps, float("nan"), 1.0, n, "") is None


def _collinear(noise: float, dtype=torch.float32, n: int = 16, d: int = 6):
    """A 2-output regression whose second output and target are twice the first's up to ``noise``: every
    sample's bias gradient lies within ~noise of one line, so the bias's orthogonal part is ~noise^2 of its
    sums; a third, one-output head's bias has no orthogonal direction at all."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.randn(n, 1, generator=g, dtype=dtype)
    Y = torch.cat([y, 2 * y + noise * torch.randn(n, 1, generator=g, dtype=dtype),
                   torch.randn(n, 1, generator=g, dtype=dtype)], 1)
    torch.manual_seed(1)
    model = nn.Linear(d, 3).to(dtype)
    with torch.no_grad():
        model.weight[1] = 2 * model.weight[0]
        model.bias[1] = 2 * model.bias[0]
    return model, torch.optim.SGD(model.parameters(), lr=0.0), X, Y


class _Split(nn.Module):
    """The same Linear(d, 3) as two heads: ``pair`` (outputs 0, 1) and ``single`` (output 2)."""

    def __init__(self, lin):
        super().__init__()
        self.pair, self.single = nn.Linear(lin.in_features, 2), nn.Linear(lin.in_features, 1)
        with torch.no_grad():
            self.pair.weight.copy_(lin.weight[:2])
            self.pair.bias.copy_(lin.bias[:2])
            self.single.weight.copy_(lin.weight[2:])
            self.single.bias.copy_(lin.bias[2:])
        self.to(lin.weight.dtype)

    def forward(self, x):
        return torch.cat([self.pair(x), self.single(x)], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tests_that_are_differences_below_rounding_are_nan_with_the_reason(tmp_path, dtype):
    """float32: the collinear bias's ortho test (difference ~1e-7 of its sums) is NaN with the reason instead of
    a value off by percents; float64 resolves it (equal to the brute force to 1e-6). The one-element bias's
    ortho test is 0 exactly in both; the other values equal the brute force."""
    lin, _, X, Y = _collinear(3e-4, dtype)
    model = _Split(lin)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ref = per_sample_grads_bruteforce(copy.deepcopy(model).double(), nn.MSELoss(reduction="none"), X.double(), Y.double())
    crit = nn.MSELoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path, quantities={k: "every" for k in TESTS}):
        opt.zero_grad()
        crit(model(X), Y).backward()
        opt.step()
    run = cockpit_lite.load(tmp_path)
    names = [n for n, _ in model.named_parameters()]
    G = {n: g.reshape(g.shape[0], -1) for n, g in zip(names, ref)}
    cond = lambda Gp: float((Gp * Gp).sum() / ((Gp * Gp).sum() - ((Gp @ Gp.mean(0)) ** 2).sum() / (Gp.mean(0) @ Gp.mean(0))))
    assert cond(G["pair.bias"]) > 1e5  # the premise: eps32 * cond > MAX_REL, eps64 * cond far below
    value = lambda key: dict(zip(*run.series(key)))[0]
    for key, fn in TESTS.items():
        for name in names:
            v = value(f"{key}/{name}")
            if key == "ortho_test" and name == "single.bias":
                assert v == 0.0
            elif key == "ortho_test" and name == "pair.bias" and dtype == torch.float32:
                assert np.isnan(v) and "float32 rounding" in run.reasons(f"{key}/{name}")[0]
            else:
                assert v == pytest.approx(fn(G[name]), rel=1e-6 if dtype == torch.float64 else 1e-4), (key, name)


def test_cancellation_thresholds():
    eps = float(torch.finfo(torch.float32).eps)
    cond_max = 2 * _resolution.CANCEL_MAX_REL / eps  # the value's error: eps * cond / 2 (a square root's)
    assert _resolution._cancelled(eps, "t", 1.0, 1.0 - 1.01 / cond_max, "", "") is None
    assert "times smaller" in _resolution._cancelled(eps, "t", 1.0, 1.0 - 0.99 / cond_max, "", " of 'w'")
    assert "inf times smaller" in _resolution._cancelled(eps, "t", 1.0, 1.0 + 1e-9, "", "")  # rounding made it < 0
    assert _resolution._cancelled(eps, "t", 0.0, 0.0, "", "") is None  # nothing to resolve: the test's own reason


class _KeyBias(nn.Module):
    """Softmax attention with its own key projection (BERT's layout): softmax is invariant to the key bias, so
    its gradient is 0 up to rounding, every sample's too."""

    def __init__(self, d=6, v=5):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(v, d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, v)

    def forward(self, idx):
        h = self.emb(idx)
        scores = self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5
        return self.head(torch.softmax(scores, -1) @ self.v(h))


def test_per_sample_gradients_that_are_rounding_noise_are_nan_with_the_reason(tmp_path):
    model = _KeyBias()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 5, (6, 4), generator=g), torch.randint(0, 5, (6, 4), generator=g)
    G, parts = per_sequence_grads(model, (x,), y, 5)
    watched_step(model, (x,), y, 5, tmp_path)
    run = cockpit_lite.load(tmp_path)
    value = lambda key: dict(zip(*run.series(key)))[0]
    for key, fn in TESTS.items():
        assert np.isnan(value(f"{key}/k.bias"))
        assert "rounding noise" in run.reasons(f"{key}/k.bias")[0]
        assert value(key) == pytest.approx(fn(G), rel=1e-4), key  # the totals keep their values
        assert value(f"{key}/k.weight") == pytest.approx(fn(parts["k.weight"]), rel=1e-4)
