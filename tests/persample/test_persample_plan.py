"""The per-step plan of per-sample work (persample/plan.py, issue 21): each layer's per-sample data is
built once per step whatever order the quantities are named in, the orders log the same values, and
those values match brute-force float64 per-sample gradients."""

import copy
import json
import math

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.persample import conv as conv_rule
from cockpit_lite.persample.plan import plan_for
from cockpit_lite.quantities.grad_hist_1d import GradHist1d
from cockpit_lite.quantities.base import Quantity
from cockpit_lite.quantities.mean_gsnr import MeanGSNR
from cockpit_lite.quantities.norm_test import NormTest
from test_gradient_noise import NOISE, assert_hist_matches, assert_noise_matches, reference_grads, train_one_step

SET = ["grad_hist_1d"] + NOISE  # histogram first: the order that used to build conv layers twice
ORDERS = [SET, NOISE + ["grad_hist_1d"], ["ortho_test", "grad_hist_1d", "mean_gsnr", "norm_test", "early_stopping",
                                          "inner_test"]]


class SharedConv(nn.Module):
    """A conv used twice in one forward (weight sharing: the summed per-sample gradients)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 5 * 5, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.tanh(self.c2(torch.tanh(self.c2(h))))
        return self.head(h.flatten(1))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))


MODELS = {"cnn": (cnn, (2, 5, 5)), "mlp": (mlp, (6,)), "shared_conv": (SharedConv, (2, 5, 5))}


def _run(make, shape, quantities, logdir, steps=3):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, *shape, generator=g), torch.randint(0, 3, (7,), generator=g)) for _ in range(steps)]
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=quantities) as cp:
        for x, y in batches:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    return cp.log_path


def _numbers(path):
    """{(step, key path): number} of every number in the log but timings."""
    out = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                walk(prefix + (k,), x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(prefix + (i,), x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix] = float(v)

    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if isinstance(rec, dict) and "step" in rec:
                walk((rec["step"],), {k: v for k, v in rec.items() if "time" not in k and k != "wall"})
    return out


@pytest.mark.parametrize("model", sorted(MODELS))
def test_orders_log_the_same_values(tmp_path, model):
    make, shape = MODELS[model]
    # grad_hist_2d (its range from the planned second moment) after, then before the others,
    # and alpha (its end point's projections from the pass) first, last, last
    lists = [["alpha"] + SET + ["grad_hist_2d"], ORDERS[1] + ["grad_hist_2d", "alpha"],
             ["grad_hist_2d"] + ORDERS[2] + ["alpha"]]
    logs = [_numbers(_run(make, shape, qs, tmp_path / f"o{k}")) for k, qs in enumerate(lists)]
    assert any("grad_hist_1d" in str(k) for k in logs[0]) and any("norm_test" in str(k) for k in logs[0])
    for other in logs[1:]:
        assert set(other) == set(logs[0])
        for k, x in logs[0].items():
            y = other[k]
            if math.isnan(x):
                assert math.isnan(y), k
            else:
                assert y == pytest.approx(x, rel=1e-5, abs=1e-7), k


def test_each_conv_layer_is_built_once_per_step(tmp_path, monkeypatch):
    """Count the conv per-sample block builds: a run of 4 steps builds each of the 2 conv layers exactly
    3 times more than a run of 1 step (the first step also measures the histogram's exact range, the
    layer rules' self-check and the route of g_i . v), in every order of the quantities."""
    builds = []
    orig = conv_rule.ConvWeightSamples._raw_chunks

    def counting(self, *args, **kwargs):
        builds.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(conv_rule.ConvWeightSamples, "_raw_chunks", counting)
    # the routes measured once per configuration: a fixed choice (timings would make the count vary)
    monkeypatch.setattr(conv_rule, "_fastest", lambda candidates, repeats=2: next(iter(candidates)))
    for k, qs in enumerate(ORDERS):
        got = []
        for steps in (1, 4):
            monkeypatch.setattr(conv_rule, "_DOTS_METHOD", {})  # the first step measures again
            monkeypatch.setattr(conv_rule, "_METHOD", {})
            builds.clear()
            _run(cnn, (2, 5, 5), qs, tmp_path / f"c{k}-{steps}", steps=steps)
            got.append(len(builds))
        assert got[1] - got[0] == 3 * 2, (qs, got)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_values_match_bruteforce_float64(tmp_path, model):
    make, shape = MODELS[model]
    torch.manual_seed(0)
    net = make()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(9, *shape, generator=g), torch.randint(0, 3, (9,), generator=g)
    ref_model = copy.deepcopy(net).double()
    run = train_one_step(net, nn.CrossEntropyLoss(), [(x, y)], tmp_path / "r", quantities=SET, divide=False)
    G = reference_grads(ref_model, nn.CrossEntropyLoss(reduction="none"), [(x.double(), y)])
    assert_noise_matches(run, ref_model, G, rtol=1e-4)
    assert_hist_matches(run, G)


def test_plan_is_order_independent_and_declared():
    a = plan_for([GradHist1d(), NormTest(), MeanGSNR()])
    b = plan_for([MeanGSNR(), NormTest(), GradHist1d()])
    assert a.stats == b.stats == frozenset({"hist", "sq", "m2"})
    assert a.wants_hist and b.wants_hist
    assert plan_for([NormTest()]).stats == frozenset({"sq"})
    assert plan_for(None).stats == frozenset()

    class HistWithoutRange(Quantity):
        name = "hist_without_range"
        per_sample_stats = frozenset({"hist"})

    assert plan_for([HistWithoutRange(), NormTest()]).stats == frozenset({"sq"})


@pytest.mark.parametrize("budget", ["default", "none"])
def test_alpha_projections_from_the_pass_match_bruteforce(tmp_path, monkeypatch, budget):
    """alpha's projections at t+1 onto the previous update come from the step's shared pass (with the
    noise tests and the histogram building the conv blocks), those at t from the blocks the pass kept
    (or, without a budget to keep them, from each layer's own route): the fit's observations still
    match the brute-force float64 reference of test_alpha.py, and the pass did serve them."""
    from cockpit_lite.persample import plan as plan_mod, view as view_mod

    if budget == "none":
        monkeypatch.setattr(view_mod, "KEEP_FLOATS", 0)
    calls = {"kept_dots": 0, "dots": 0}
    for name in calls:
        def wrapped(self, *a, _name=name, _orig=getattr(conv_rule.ConvWeightSamples, name)):
            calls[_name] += 1
            return _orig(self, *a)
        monkeypatch.setattr(conv_rule.ConvWeightSamples, name, wrapped)
    served = []
    orig = plan_mod.layer_pass

    def recording(parts, batch_sizes, wanted, *a, **k):
        served.append("dir" in wanted)
        return orig(parts, batch_sizes, wanted, *a, **k)

    monkeypatch.setattr(view_mod, "layer_pass", recording)

    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Linear(3 * 4 * 4, 3))

    _alpha_matches_reference(make, (2, 6, 6), tmp_path)
    assert any(served)
    if budget == "none":
        assert calls["kept_dots"] == 0 and calls["dots"] > 0
    else:  # 2 conv layers, 4 steps, after each: from the kept blocks, never through a convolution
        assert calls["kept_dots"] >= 2 * 4 and calls["dots"] == 0, calls


def test_planned_direction_changed_in_place_is_not_served():
    """The view serves the planned direction's projections only while its tensors are the same and
    unchanged (alpha overwrites its direction buffer in place after the step)."""
    d = [torch.ones(3), torch.zeros(2)]
    q = type("Q", (Quantity,), {"name": "q", "per_sample_direction": lambda self, step: d})()
    p = plan_for([q], step=5)
    assert "dir" in p.stats and p.serves(d)
    assert not p.serves([d[0].clone(), d[1]])
    d[1].add_(1.0)
    assert not p.serves(d)


def test_alpha_fused_equals_apart_with_accumulation(tmp_path, monkeypatch):
    """Two micro-batches of different sizes per step: alpha's observations with its projections from
    the step's pass (kept blocks per micro-batch) equal those computed apart, to 1e-5."""
    from cockpit_lite.quantities.alpha import Alpha

    def run(logdir):
        torch.manual_seed(0)
        model = cnn()
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        crit = nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(5)
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir, quantities=["alpha"] + SET) as cp:
            for _ in range(3):
                opt.zero_grad()
                for b in (5, 3):
                    x, y = torch.randn(b, 2, 5, 5, generator=g), torch.randint(0, 3, (b,), generator=g)
                    (crit(model(x), y) / 2).backward()
                opt.step()
        return dict(cockpit_lite.load(cp.log_path).data("alpha"))

    fused = run(tmp_path / "fused")
    monkeypatch.setattr(Alpha, "per_sample_direction", lambda self, step: None)
    monkeypatch.setattr(Alpha, "per_sample_keep", lambda self, step: False)
    apart = run(tmp_path / "apart")
    assert sorted(fused) == sorted(apart) == [0, 1]
    for step in fused:
        for key in ("df0", "df1", "var_df0", "var_df1", "f0", "f1", "t"):
            assert fused[step][key] == pytest.approx(apart[step][key], rel=1e-5, abs=1e-8), (step, key)


def test_alpha_projection_at_t_from_kept_sequence_linear_blocks(tmp_path, monkeypatch):
    """A Linear layer over a sequence (T > 1) builds its per-sample gradients for the histogram; the pass
    keeps them and alpha's projection after the optimizer step comes from them (no GEMM the size of the
    layer's forward), with the fit's observations equal to the brute-force float64 reference."""
    from cockpit_lite.persample import linear as linear_rule
    from cockpit_lite.persample.samples import ParamSamples

    calls = {"kept_dots": 0, "dots": 0}
    for cls, name in ((ParamSamples, "kept_dots"), (linear_rule.LinearWeightSamples, "dots")):
        def wrapped(self, *a, _name=name, _orig=getattr(cls, name)):
            if isinstance(self, linear_rule.LinearWeightSamples) and self.A.shape[1] > 1:  # the sequence layer
                calls[_name] += 1
            return _orig(self, *a)
        monkeypatch.setattr(cls, name, wrapped)

    def make():
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6, 3))

    _alpha_matches_reference(make, (4, 5), tmp_path)
    assert calls["kept_dots"] >= 4 and calls["dots"] == 0, calls  # the sequence layer, after each step


def _alpha_matches_reference(make, shape, tmp_path):
    """Train ``make()`` 4 SGD steps with alpha and the histogram set every step; alpha's observations of
    steps 0-2 equal the float64 reference of test_alpha.py."""
    from test_alpha import make_batches, reference_alpha

    batches = make_batches(shape, steps=4)
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    thetas = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "a", quantities=["alpha"] + SET) as cp:
        for x, y in batches:
            thetas.append([p.detach().clone() for p in model.parameters()])
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
        thetas.append([p.detach().clone() for p in model.parameters()])
    run = cockpit_lite.load(cp.log_path)
    details = dict(run.data("alpha"))
    assert sorted(details) == [0, 1, 2], run.reasons("alpha")
    for step in (0, 1, 2):
        _, obs, _ = reference_alpha(make, thetas, batches, step)
        for key, value in obs.items():
            assert details[step][key] == pytest.approx(value, rel=2e-4, abs=1e-6), (step, key)
