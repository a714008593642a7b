"""alpha from a watched training loop against a brute-force reference, for several optimizers.

The reference is independent of cockpit-lite's fast path: parameters theta_t are snapshotted by the
test loop itself, per-sample losses and gradients come from a loop of torch.autograd.grad over single
samples (tests/reference.py) in float64, the update is d = theta_{t+1} - theta_t, and the weighted
least-squares fit is solved here with numpy's lstsq on the whitened system.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from helpers import watched_training
from reference import per_sample_grads_bruteforce, per_sample_losses


# -- problems ------------------------------------------------------------------------------------
def small_mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def small_cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))


PROBLEMS = {
    "mlp": (small_mlp, (6,)),
    "cnn": (small_cnn, (2, 6, 6)),
}


def make_batches(shape, steps, batch_size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, *shape, generator=g), torch.randint(0, 3, (batch_size,), generator=g))
            for _ in range(steps)]


class SignDescent(torch.optim.Optimizer):
    """An optimizer no library knows: theta <- theta - lr * sign(grad) * |grad|^0.5."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign() * p.grad.abs().sqrt(), alpha=-group["lr"])


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.2),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.02),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.5),
}
EXTRA_OPTIMIZERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.1),
    "sign_descent": lambda ps: SignDescent(ps, lr=0.05),
}


def train_watched(make_model, make_opt, batches, logdir, schedule="every", loss_fn=None, clip=None, scheduler=None):
    """The user's loop, unchanged, with a cockpit tracking only alpha; returns (run, thetas)."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model.parameters())
    sched = scheduler(opt) if scheduler else None
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    trained = watched_training(model, opt, loss_fn, batches, logdir, clip=clip, scheduler=sched,
                               quantities={"alpha": schedule})
    return trained.run, [list(theta.values()) for theta in trained.thetas]


# -- the brute-force reference ----------------------------------------------------------------------
def model_at(make_model, theta):
    model = make_model().double()
    with torch.no_grad():
        for p, value in zip(model.parameters(), theta):
            p.copy_(value.double())
    return model


def observe(make_model, theta, batch, direction, loss_none):
    """(losses[B], projections[B]) at theta on batch, projections g_i . direction, in float64."""
    model = model_at(make_model, theta)
    x, y = batch[0].double(), batch[1]
    losses = per_sample_losses(model, loss_none, x, y).numpy()
    grads = per_sample_grads_bruteforce(model, loss_none, x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1).numpy()
    return losses, flat @ direction


def reference_alpha(make_model, thetas, batches, step, loss_none=None):
    loss_none = loss_none or nn.CrossEntropyLoss(reduction="none")
    d = torch.cat([(b - a).double().reshape(-1) for a, b in zip(thetas[step], thetas[step + 1])]).numpy()
    t = float(np.linalg.norm(d))
    u = d / t
    l0, p0 = observe(make_model, thetas[step], batches[step], u, loss_none)
    l1, p1 = observe(make_model, thetas[step + 1], batches[step + 1], u, loss_none)
    obs = dict(t=t, f0=l0.mean(), f1=l1.mean(), df0=p0.mean(), df1=p1.mean(), var_f0=l0.var(ddof=1),
               var_f1=l1.var(ddof=1), var_df0=p0.var(ddof=1), var_df1=p1.var(ddof=1))
    phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=np.float64)
    var = np.array([obs["var_f0"], obs["var_f1"], obs["var_df0"], obs["var_df1"]])
    sd = np.sqrt(np.where(var == 0, 1e-10, var))
    y = np.array([obs["f0"], obs["f1"], obs["df0"], obs["df1"]])
    w = np.linalg.lstsq(phi / sd[:, None], y / sd, rcond=None)[0]
    alpha = -1.0 if w[2] < 0 else 2 * t / (-w[1] / w[2]) - 1
    return alpha, obs, w


def assert_matches_reference(run, make_model, thetas, batches, steps):
    got_steps, alphas = run.series("alpha")
    assert list(got_steps) == list(steps), run.reasons("alpha")
    details = dict(run.data("alpha"))
    for step, alpha in zip(got_steps, alphas):
        ref_alpha, obs, w = reference_alpha(make_model, thetas, batches, int(step))
        fit = details[int(step)]
        for key, value in obs.items():
            assert fit[key] == pytest.approx(value, rel=2e-4, abs=1e-6), (step, key)
        assert fit["w"] == pytest.approx(list(w), rel=2e-3, abs=1e-5)
        assert alpha == pytest.approx(ref_alpha, rel=2e-3, abs=2e-3), step
        assert fit["n0"] == fit["n1"] == batches[0][0].shape[0]


# -- tests ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_alpha_matches_bruteforce(problem, optimizer, logdir):
    make_model, shape = PROBLEMS[problem]
    batches = make_batches(shape, steps=4)
    run, thetas = train_watched(make_model, OPTIMIZERS[optimizer], batches, logdir)
    assert_matches_reference(run, make_model, thetas, batches, steps=[0, 1, 2])
    assert not run.reasons("alpha")


@pytest.mark.parametrize("optimizer", sorted(EXTRA_OPTIMIZERS))
def test_alpha_other_optimizers(optimizer, logdir):
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=3)
    run, thetas = train_watched(make_model, EXTRA_OPTIMIZERS[optimizer], batches, logdir)
    assert_matches_reference(run, make_model, thetas, batches, steps=[0, 1])


def test_alpha_with_clipping_scheduler_and_param_groups(logdir):
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=4)

    def two_groups(params):
        params = list(params)
        return torch.optim.SGD([{"params": params[:2], "lr": 0.3}, {"params": params[2:], "lr": 0.05}],
                               momentum=0.5, weight_decay=0.01)

    run, thetas = train_watched(make_model, two_groups, batches, logdir, clip=0.5,
                                scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    assert_matches_reference(run, make_model, thetas, batches, steps=[0, 1, 2])


def test_every_3_observes_pairs_and_reports_only_starts(logdir):
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=8)
    run, thetas = train_watched(make_model, OPTIMIZERS["sgd"], batches, logdir, schedule="every:3")
    assert_matches_reference(run, make_model, thetas, batches, steps=[0, 3, 6])
    # steps 1, 4, 7 are observed as end points (records without an alpha of their own); 2, 5 are not observed
    assert [r["step"] for r in run.records] == [0, 1, 3, 4, 6, 7]
    assert all("alpha" not in r.get("values", {}) for r in run.records if r["step"] in (1, 4, 7))


@pytest.mark.parametrize("lr, expected", [(0.5, 0.0), (1.0, 1.0), (0.25, -0.5), (0.0, -1.0)])
def test_quadratic_problem_closed_form(lr, expected, logdir):
    """f(theta) = mean_i (theta x_i - y_i)^2 with x_i = 1, y_i = 1: the parabola (theta - 1)^2, no noise.

    From theta = 0, SGD with lr 0.5 steps onto the minimum (alpha 0), lr 1 onto the mirrored point
    (alpha 1), lr 0.25 half-way (alpha -0.5), lr 0 does not move (alpha -1).
    """
    def model_fn():
        m = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(m.weight)
        return m

    batches = [(torch.ones(4, 1), torch.ones(4, 1)) for _ in range(2)]
    run, _ = train_watched(model_fn, lambda ps: torch.optim.SGD(ps, lr=lr), batches, logdir, loss_fn=nn.MSELoss())
    steps, alphas = run.series("alpha")
    assert list(steps) == [0]
    assert alphas[0] == pytest.approx(expected, abs=1e-5)
    fit = dict(run.data("alpha"))[0]
    assert fit["case"] == ("no_step" if lr == 0 else "fit")
    assert fit["var_f0"] == 0 and fit["var_df0"] == 0


def test_skipped_next_step_gives_nan_with_reason(logdir):
    """A GradScaler skips step 1 (inf gradients): alpha of step 0 is NaN with the reason; later steps work."""
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=5)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities={"alpha": "every"}):
        for k, (x, y) in enumerate(batches):
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            if k == 1:
                loss = loss * math.inf  # overflow: the scaler finds inf gradients and skips the step
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    run = cockpit_lite.load(logdir)
    assert [s["step"] for s in run.skipped] == [1]
    steps, alphas = run.series("alpha")
    by_step = dict(zip(steps.tolist(), alphas.tolist()))
    assert math.isnan(by_step[0]) and "skipped" in run.reasons("alpha")[0]
    # step 2 starts a fresh pair (2, 3), step 3 another (3, 4); the last step has no successor
    assert math.isfinite(by_step[2]) and math.isfinite(by_step[3])
    assert 4 not in by_step


def test_batch_of_one_gives_nan_with_reason(logdir):
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=3, batch_size=1)
    run, _ = train_watched(make_model, OPTIMIZERS["sgd"], batches, logdir)
    steps, alphas = run.series("alpha")
    assert len(steps) >= 1 and np.isnan(alphas).all()
    assert all("at least 2" in r for r in run.reasons("alpha").values())


def test_distribution_is_readable_from_the_log(logdir):
    """What an instrument needs: every alpha with its step, the fit details, and the reasons."""
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=6)
    run, _ = train_watched(make_model, OPTIMIZERS["adam"], batches, logdir)
    steps, alphas = run.series("alpha")
    assert list(steps) == [0, 1, 2, 3, 4] and np.isfinite(alphas).all()
    details = dict(run.data("alpha"))
    assert sorted(details) == [0, 1, 2, 3, 4]
    for step, fit in details.items():
        assert set(fit) >= {"t", "f0", "f1", "df0", "df1", "var_f0", "var_f1", "var_df0", "var_df1", "w", "case"}
        assert fit["t"] > 0


class TinyAttention(nn.Module):
    """Embedding by a Linear, one self-attention block (its per-sample gradients depend on its weights)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x [B, 5, 3]
        h = self.embed(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def test_alpha_attention_with_adam(logdir):
    """Attention's per-sample gradients depend on its own weights: the start point must use theta_t."""
    batches = make_batches((5, 3), steps=3, batch_size=6)
    run, thetas = train_watched(TinyAttention, OPTIMIZERS["adam"], batches, logdir)
    assert_matches_reference(run, TinyAttention, thetas, batches, steps=[0, 1])


def test_alpha_with_gradient_accumulation(logdir):
    """Two micro-batches of 4 per optimizer step (loss / 2): alpha is that of the 8-sample batch."""
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=3, batch_size=8)
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    loss_fn = nn.CrossEntropyLoss()
    thetas = []
    with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=logdir, quantities={"alpha": "every"}):
        for x, y in batches:
            thetas.append([p.detach().clone() for p in model.parameters()])
            opt.zero_grad()
            for xs, ys in zip(x.split(4), y.split(4)):
                (loss_fn(model(xs), ys) / 2).backward()
            opt.step()
        thetas.append([p.detach().clone() for p in model.parameters()])
    assert_matches_reference(cockpit_lite.load(logdir), make_model, thetas, batches, steps=[0, 1])


def test_unsupported_layer_gives_nan_with_reason(logdir):
    """BatchNorm in training mode mixes the samples of a batch: no per-sample gradients, so NaN + reason."""
    def bn_model():
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    batches = make_batches((6,), steps=3)
    run, _ = train_watched(bn_model, OPTIMIZERS["sgd"], batches, logdir)
    steps, alphas = run.series("alpha")
    assert list(steps) == [0, 1, 2] and np.isnan(alphas).all()
    assert all("per-sample gradients are not available" in r for r in run.reasons("alpha").values())


def test_without_loss_module_alpha_is_nan_with_reason(logdir):
    """A loss given as a plain function cannot be observed: alpha is NaN with a reason, training goes on."""
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="plain function"):
        cockpit = cockpit_lite.watch(model, opt, loss_fn=nn.functional.cross_entropy, logdir=logdir,
                                     quantities={"alpha": "every"})
    with cockpit:
        for x, y in batches:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(logdir)
    steps, alphas = run.series("alpha")
    assert len(steps) == 3 and np.isnan(alphas).all()
    assert len(run.reasons("alpha")) == 3


def test_sum_reduction_gives_the_same_fit_as_the_mean(logdir):
    """With reduction='sum' the fit uses the per-sample mean too (alpha does not depend on the loss scale)."""
    make_model, shape = PROBLEMS["mlp"]
    batches = make_batches(shape, steps=3)
    run, thetas = train_watched(make_model, lambda ps: torch.optim.SGD(ps, lr=0.02), batches, logdir,
                                loss_fn=nn.CrossEntropyLoss(reduction="sum"))
    assert_matches_reference(run, make_model, thetas, batches, steps=[0, 1])


def test_run_ending_right_after_a_skipped_step_keeps_the_reason(logdir):
    """The NaN reason of the step before a skip is written on the next step; when the run ends right after
    the skip there is none, and the reason is written at close."""
    torch.manual_seed(0)
    model = small_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    batches = make_batches((6,), steps=3)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities={"alpha": "every"}):
        for i, (x, y) in enumerate(batches):
            opt.zero_grad()
            crit(model(x), y).backward()
            if i < 2:
                opt.step()
        # the third backward is never stepped: close() records it as skipped
    run = cockpit_lite.load(logdir)
    assert [s["step"] for s in run.skipped] == [2]
    reasons = run.reasons("alpha")
    assert 1 in reasons and "skipped" in reasons[1], reasons
    assert np.isfinite(dict(zip(*run.series("alpha")))[0])


def test_frozen_param_group_gives_the_alpha_of_the_trainable_parameters(logdir):
    """Parameters with requires_grad=False in an optimizer group never move and have no gradient: alpha is
    that of the trainable parameters, the same as with the frozen ones left out of the optimizer (the
    per-sample self-check must not differentiate them either)."""
    batches = make_batches((6,), steps=4)
    runs = []
    for name in ("frozen_in_optimizer", "frozen_left_out"):
        torch.manual_seed(0)
        model = small_mlp()
        for p in model[0].parameters():
            p.requires_grad_(False)
        if name == "frozen_in_optimizer":
            opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                                   {"params": model[2].parameters()}], lr=0.2, momentum=0.9)
        else:
            opt = torch.optim.SGD(model[2].parameters(), lr=0.2, momentum=0.9)
        crit = nn.CrossEntropyLoss()
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir / name, quantities=["alpha", "norm_test"]):
            for x, y in batches:
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
        runs.append(cockpit_lite.load(logdir / name))
    frozen, left_out = runs
    assert frozen.records[0]["data"]["persample_check"]["status"] == "passed"
    s1, a1 = frozen.series("alpha")
    s2, a2 = left_out.series("alpha")
    assert list(s1) == list(s2) == [0, 1, 2] and not frozen.reasons("alpha")
    np.testing.assert_allclose(a1, a2, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(frozen.series("norm_test")[1], left_out.series("norm_test")[1], rtol=1e-5)
