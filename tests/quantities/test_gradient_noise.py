"""The gradient-noise quantities, read back from the run log, against QUANTITIES.md evaluated on
brute-force per-sample gradients (tests/reference.py), per parameter and total."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from helpers import watched_training
import reference as ref
from test_persample_view import SeqCE, TinyEncoder, ce_seq_none

NOISE = ["norm_test", "inner_test", "ortho_test", "mean_gsnr", "early_stopping"]
ALL = NOISE + ["cabs", "grad_hist_1d"]
REF = {"norm_test": ref.norm_test, "inner_test": ref.inner_test, "ortho_test": ref.ortho_test,
       "mean_gsnr": ref.mean_gsnr, "early_stopping": ref.early_stopping}


def train_one_step(model, loss_fn, batches, logdir, quantities=ALL, opt=None, divide=True):
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.05)
    batches = list(batches)
    run = watched_training(model, opt, loss_fn, batches, logdir, accumulate=len(batches), divide=divide,
                           quantities=quantities).run
    # the self-check of the layer rules against autograd (engine/selfcheck.py) passes on every model here
    assert run.records[0]["data"]["persample_check"]["status"] == "passed", run.records[0]["data"]["persample_check"]
    return run


def value(run, key):
    steps, vals = run.series(key)
    assert len(vals) == 1, key
    return float(vals[0])


def reference_grads(model0, loss_none, batches, weights=None):
    parts = [ref.per_sample_grads_bruteforce(model0, loss_none, x, y, weights=weights) for x, y in batches]
    return [torch.cat([p[j] for p in parts]) for j in range(len(parts[0]))]


def assert_noise_matches(run, model0, G_list, rtol=1e-3):
    names = [n for n, _ in model0.named_parameters()]
    G = ref.flat(G_list)
    for q in NOISE:
        assert run.reasons(q) == {}, (q, run.reasons(q))
        assert value(run, q) == pytest.approx(REF[q](G), rel=rtol, abs=1e-6), q
        for name, Gj in zip(names, G_list):
            assert value(run, f"{q}/{name}") == pytest.approx(REF[q](ref.flat([Gj])), rel=rtol, abs=1e-6), (q, name)


def assert_hist_matches(run, G_list, step_index=0, exact_range=True):
    step, h = run.data("grad_hist_1d")[step_index]
    edges = np.asarray(h["edges"])
    assert len(edges) == 101 and len(h["counts"]) == 100 and h["scale"] == "B*g_ij"
    vals = ref.flat(G_list).reshape(-1).float()
    R = edges[-1]
    assert edges[0] == pytest.approx(-R)
    if exact_range:
        assert R == pytest.approx(float(vals.abs().max()), rel=1e-4)  # the range fits this step's values
        # and R is the product's own maximum of them: none of its own values lies beyond it
        assert h["clipped"] == 0
    # clipped: the elements beyond R. R is the exact maximum of the step's values where that is cheap, so the
    # largest element sits on the edge, and the brute-force reference (per-sample forwards: another float32
    # summation order) may put it 1 ulp outside (0.99198240 vs R = 0.99198234 with 2 threads): an element
    # within float32 rounding of R (1e-6 relative, as in test_grad_hist_2d) may count either way
    surely_out = int((vals.abs() > R * (1 + 1e-6)).sum())
    maybe_out = int((vals.abs() > R * (1 - 1e-6)).sum())
    assert surely_out <= h["clipped"] <= maybe_out, (h["clipped"], surely_out, maybe_out)
    # bins [e_k, e_k+1), the outer ones open (clamping), in float64 (zero lands in bin 50)
    expected = torch.bincount(((vals.double() + R) / (2 * R) * 100).floor().clamp(0, 99).long(), minlength=100)
    counts = np.asarray(h["counts"])
    assert counts.sum() == vals.numel()
    # rounding at bin edges: a few elements, plus float noise around exact zeros (|x| < 1e-5 R, e.g. gradients
    # that cancel) which may sit on either side of the middle edge
    near_zero = int(((vals.abs() < 1e-5 * R) & (vals != 0)).sum())
    assert np.abs(counts - expected.numpy()).sum() <= 2 * near_zero + 2 + 1e-4 * vals.numel()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp(tmp_path, reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    model0 = copy.deepcopy(model)
    with torch.no_grad():
        loss0 = float(nn.CrossEntropyLoss()(model0(x), y))
    run = train_one_step(model, nn.CrossEntropyLoss(reduction=reduction), [(x, y)], tmp_path / "r")
    G = reference_grads(model0, nn.CrossEntropyLoss(reduction="none"), [(x, y)])
    assert_noise_matches(run, model0, G)
    assert value(run, "cabs") == pytest.approx(ref.cabs(ref.flat(G), 0.05, loss0), rel=1e-4)
    assert_hist_matches(run, G)


def test_cnn_strided_dilated_grouped(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=2), nn.ReLU(),
        nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 3, (6,))
    model0 = copy.deepcopy(model)
    run = train_one_step(model, nn.CrossEntropyLoss(), [(x, y)], tmp_path / "r")
    G = reference_grads(model0, nn.CrossEntropyLoss(reduction="none"), [(x, y)])
    assert_noise_matches(run, model0, G)
    assert_hist_matches(run, G)


def test_transformer_encoder(tmp_path):
    torch.manual_seed(2)
    model = TinyEncoder()
    idx, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 11, (5, 4))
    model0 = copy.deepcopy(model)
    run = train_one_step(model, SeqCE(), [(idx, y)], tmp_path / "r", quantities=NOISE + ["grad_hist_1d"])
    G = reference_grads(model0, ce_seq_none, [(idx, y)], weights=torch.full((5,), 1 / 4))
    assert_noise_matches(run, model0, G, rtol=2e-3)
    assert_hist_matches(run, G)


def test_gradient_accumulation_full_effective_batch(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    model0 = copy.deepcopy(model)
    with torch.no_grad():
        loss0 = float(nn.CrossEntropyLoss()(model0(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])))
    run = train_one_step(model, nn.CrossEntropyLoss(), batches, tmp_path / "r")  # user divides each loss by 3
    G = reference_grads(model0, nn.CrossEntropyLoss(reduction="none"), batches)
    assert G[0].shape[0] == 12
    assert_noise_matches(run, model0, G)
    assert value(run, "cabs") == pytest.approx(ref.cabs(ref.flat(G), 0.05, loss0), rel=1e-4)
    assert_hist_matches(run, G)


def test_batchnorm_training_mode_gives_nan_with_reason(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    run = train_one_step(model, nn.CrossEntropyLoss(), [(torch.randn(8, 4), torch.randint(0, 2, (8,)))],
                         tmp_path / "r")
    for q in NOISE + ["cabs"]:
        assert math.isnan(value(run, q))
        assert "BatchNorm in training mode" in run.reasons(q)[0]
    assert math.isnan(value(run, "norm_test/1.weight"))
    assert math.isfinite(value(run, "norm_test/3.weight"))  # layers after the BatchNorm are fine
    (_, h), = run.data("grad_hist_1d")
    assert "0.weight" in h["excluded"] and sum(h["counts"]) == 8 * (5 * 2 + 2)


@pytest.mark.parametrize("opt_kind", ["adam", "momentum"])
def test_cabs_needs_plain_sgd(tmp_path, opt_kind):
    model = nn.Sequential(nn.Linear(3, 2))
    opt = (torch.optim.Adam(model.parameters()) if opt_kind == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    run = train_one_step(model, nn.MSELoss(), [(torch.randn(4, 3), torch.randn(4, 2))], tmp_path / "r",
                         quantities=["cabs", "norm_test"], opt=opt)
    assert math.isnan(value(run, "cabs")) and run.reasons("cabs")
    assert math.isfinite(value(run, "norm_test"))


def test_several_steps_and_presets(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lf = nn.CrossEntropyLoss()
    cp = cockpit_lite.watch(model, opt, loss_fn=lf, logdir=tmp_path / "r",
                            quantities=cockpit_lite.presets.preset("economy", schedule="every"))
    for s in range(3):
        x, y = torch.randn(5, 1, 6, 6), torch.randint(0, 3, (5,))
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
    cp.close()
    run = cockpit_lite.load(tmp_path / "r")
    for q in ("norm_test", "inner_test", "ortho_test"):
        steps, vals = run.series(q)
        assert list(steps) == [0, 1, 2] and np.isfinite(vals).all()
    hists = run.data("grad_hist_1d")
    assert len(hists) == 3
    # the preset's own schedule: per-sample quantities every PER_SAMPLE_EVERY steps
    assert cockpit_lite.presets.preset("economy")["norm_test"] == f"every:{cockpit_lite.presets.PER_SAMPLE_EVERY}"
    P = sum(p.numel() for p in model.parameters())
    for step, h in hists:  # every element of every per-sample gradient is counted once
        assert sum(h["counts"]) == 5 * P and h["clipped"] >= 0


def test_histogram_on_a_later_step_uses_the_adapted_range(tmp_path):
    """Step 1 of a CNN: conv ranges come from step 0; the counts still match brute force (clipped
    values in the edge bins) through the fused per-layer pass."""
    torch.manual_seed(6)

    def make():
        return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2),
                             nn.Flatten(), nn.Linear(2 * 3 * 3, 3))

    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lf = nn.CrossEntropyLoss()
    cp = cockpit_lite.watch(model, opt, loss_fn=lf, logdir=tmp_path / "r", quantities=ALL)
    batches = [(torch.randn(6, 2, 7, 7) * (1 + 2 * s), torch.randint(0, 3, (6,))) for s in range(2)]
    for s, (x, y) in enumerate(batches):
        if s == 1:  # theta at step 1 (a deepcopy would copy the cockpit's hooks)
            model1 = make()
            model1.load_state_dict(model.state_dict())
        opt.zero_grad()
        lf(model(x), y).backward()
        opt.step()
    cp.close()
    run = cockpit_lite.load(tmp_path / "r")
    G = reference_grads(model1, nn.CrossEntropyLoss(reduction="none"), [batches[1]])
    assert_hist_matches(run, G, step_index=1, exact_range=False)
    assert_noise_matches(_only_step(run, 1), model1, G)


def _only_step(run, step):
    class One:
        def series(self, key):
            steps, vals = run.series(key)
            keep = steps == step
            return steps[keep], vals[keep]

        def reasons(self, key):
            return {s: r for s, r in run.reasons(key).items() if s == step}
    return One()


@pytest.mark.parametrize("head", [1, 2], ids=["one_output", "two_classes"])
def test_accumulation_over_micro_batches_of_different_sizes(tmp_path, head):
    """Micro-batches of 3 and 5 samples, each loss divided by 2: .grad = (mean_3 + mean_5) / 2 is not
    proportional to the mean over the 8 samples, which a check on a 1-element bias, or on the bias of a
    2-class softmax (always (a, -a)), cannot see."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, head)).double()
    g = torch.Generator().manual_seed(7)
    if head == 1:
        loss_fn, loss_none = nn.MSELoss(), nn.MSELoss(reduction="none")
        batches = [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randn(b, 1, generator=g, dtype=torch.float64))
                   for b in (3, 5)]
    else:
        loss_fn, loss_none = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="none")
        batches = [(torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (b,), generator=g))
                   for b in (3, 5)]
    model0 = copy.deepcopy(model)
    run = train_one_step(model, loss_fn, batches, tmp_path / "r", quantities=NOISE)
    G = reference_grads(model0, loss_none, batches)
    assert G[0].shape[0] == 8
    names = [n for n, _ in model0.named_parameters()]
    for q in NOISE:
        assert value(run, q) == pytest.approx(REF[q](ref.flat(G)), rel=1e-6), q
        for name, Gj in zip(names, G):
            expected = float(REF[q](ref.flat([Gj])))
            if math.isfinite(expected):  # the 2-class bias's ortho test is 0/0 (its g_i are all along g)
                assert value(run, f"{q}/{name}") == pytest.approx(expected, rel=1e-6, abs=1e-9), (q, name)


def test_frozen_parameters_in_the_optimizer_are_left_out(tmp_path):
    """Parameters with requires_grad=False inside an optimizer group (common when fine-tuning) are not
    trained: the statistics are those of the trainable parameters; their own per-parameter values are
    NaN with that reason, and the histogram holds no elements of theirs."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    for p in model[2].parameters():  # a frozen middle layer
        p.requires_grad_(False)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    model0 = copy.deepcopy(model)
    run = train_one_step(model, nn.CrossEntropyLoss(), [(x, y)], tmp_path / "r", quantities=NOISE + ["grad_hist_1d"],
                         opt=torch.optim.SGD(model.parameters(), lr=0.05))
    trainable = [n for n, p in model0.named_parameters() if p.requires_grad]
    G = ref.per_sample_grads_bruteforce(model0, nn.CrossEntropyLoss(reduction="none"), x, y,
                                        params=[p for p in model0.parameters() if p.requires_grad])
    Gf = ref.flat(G)
    for q in NOISE:
        assert value(run, q) == pytest.approx(REF[q](Gf), rel=1e-3, abs=1e-6), q
        for name, Gj in zip(trainable, G):
            assert value(run, f"{q}/{name}") == pytest.approx(REF[q](ref.flat([Gj])), rel=1e-3, abs=1e-6), (q, name)
        assert "frozen" in run.reasons(f"{q}/2.weight")[0]
    assert_hist_matches(run, G)


def test_a_module_called_without_the_batch_dimension_is_named_not_miscounted(tmp_path):
    """A position embedding on arange(T) (T != B) broadcast over the batch, with the usual language-model
    loss on flattened logits written inline (the model output not kept: the loss input's autograd node says
    what it reshaped, persample/output_view.py): its rows are positions, not samples. Its per-sample gradients
    come from the per-sample replay and equal a float64 brute force; never a finite value computed over
    positions."""
    from unseen_models import Unseen, flat, reference

    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(7, 4), nn.Embedding(6, 4), nn.Linear(4, 7)

        def forward(self, idx):
            return self.head(self.tok(idx) + self.pos(torch.arange(idx.shape[1])))

    class FlatCE(nn.CrossEntropyLoss):
        pass

    torch.manual_seed(6)
    model, crit = TinyLM(), FlatCE()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    quantities = NOISE + ["grad_hist_1d"]
    batches = [(torch.randint(0, 7, (4, 6)), torch.randint(0, 7, (4, 6))) for _ in range(2)]
    snaps = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "r", quantities=quantities):
        for idx, y in batches:
            snaps.append(copy.deepcopy(model.state_dict()))
            opt.zero_grad()
            crit(model(idx).reshape(-1, 7), y.reshape(-1)).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path / "r")
    for step, ((idx, y), state) in enumerate(zip(batches, snaps)):
        fresh = TinyLM()
        fresh.load_state_dict(state)
        _, G, names = reference(Unseen("pos", fresh, FlatCE(), [(idx, y, 1.0)], flat), fresh)
        for q in NOISE:
            assert run.reasons(q) == {}, q
            assert run.series(q)[1][step] == pytest.approx(REF[q](ref.flat(G)), rel=1e-4), (q, step)
            j = names.index("pos.weight")
            assert run.series(f"{q}/pos.weight")[1][step] == pytest.approx(REF[q](ref.flat([G[j]])), rel=1e-4), (q, step)
