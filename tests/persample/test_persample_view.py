"""ctx.per_sample (PerSampleView) against brute-force per-sample gradients, layer type by layer type.

A probe quantity reads the view inside the real engine (cockpit_lite.watch on a plain loop); the
reference is a loop of torch.autograd.grad over single samples (tests/reference.py).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite

from helpers import Probe
from reference import per_sample_grads_bruteforce, per_sample_losses


def run_probe(model, loss_fn, batches, tmp_path, accumulate=True, optimizer=None):
    probe = Probe(full=True)
    probe.model_before = copy.deepcopy(model)  # the reference is taken at theta_t, before the step
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.01)
    cp = cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path / "run", quantities=[probe])
    opt.zero_grad()
    k = len(batches)
    for x, y in batches:
        loss = loss_fn(model(x), y)
        (loss / k if accumulate else loss).backward()
    opt.step()
    cp.close()
    return probe


def check_against(probe, model, loss_none, batches, weights=None, rtol=1e-4, atol=1e-6):
    model = probe.model_before
    params = list(model.parameters())
    parts = [per_sample_grads_bruteforce(model, loss_none, x, y, params, weights=weights) for x, y in batches]
    ref = [torch.cat([p[j] for p in parts]) for j in range(len(params))]
    assert probe.unsupported == {}
    assert probe.n == ref[0].shape[0]
    for j, G in enumerate(ref):
        G = G.double()
        n = G.shape[0]
        g = G.mean(0)
        scale = float(G.abs().max()) + 1e-12
        torch.testing.assert_close(probe.G[j].double(), G, rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(probe.sq[j].double(), G.reshape(n, -1).pow(2).sum(1), rtol=rtol, atol=atol * scale ** 2)
        torch.testing.assert_close(probe.mean[j].double(), g, rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(probe.dots[j].double(), G.reshape(n, -1) @ g.reshape(-1), rtol=rtol,
                                   atol=atol * scale ** 2 * g.numel())
        torch.testing.assert_close(probe.m2[j].double(), G.pow(2).sum(0), rtol=rtol, atol=atol * scale ** 2)
        torch.testing.assert_close(probe.sums[j].double(), G.sum(0), rtol=rtol, atol=atol * scale * n)
        if probe.cheap[j] is not None:
            assert probe.cheap[j] == pytest.approx(float(G.abs().max()), rel=1e-4)
    return ref


def ce_seq_none(out, y):
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="none")


class SeqCE(nn.Module):
    """Cross-entropy over a sequence: logits [b, T, V] flattened as an LM does."""

    def __init__(self, reduction="mean"):
        super().__init__()
        self.reduction = reduction

    def forward(self, out, y):
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=self.reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_mlp_view_and_losses(tmp_path, reduction):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    probe = run_probe(model, nn.CrossEntropyLoss(reduction=reduction), [(x, y)], tmp_path)
    check_against(probe, model, nn.CrossEntropyLoss(reduction="none"), [(x, y)])
    torch.testing.assert_close(probe.losses, per_sample_losses(probe.model_before, nn.CrossEntropyLoss(reduction="none"), x, y))


def test_gradient_accumulation_covers_all_micro_batches(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    batches = [(torch.randn(5, 4), torch.randn(5, 2)), (torch.randn(3, 4), torch.randn(3, 2))]
    probe = run_probe(model, nn.MSELoss(), batches, tmp_path)
    # MSELoss(mean) over [b, 2]: l_i = (b/N) sum of the sample's 2 elements = mean over its elements
    ref = [per_sample_grads_bruteforce(probe.model_before, nn.MSELoss(reduction="none"), x, y, weights=torch.full((len(x),), 0.5))
           for x, y in batches]
    assert probe.n == 8
    for j in range(len(ref[0])):
        torch.testing.assert_close(probe.G[j], torch.cat([r[j] for r in ref]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(probe.sq[0].double(), torch.cat([r[0] for r in ref]).reshape(8, -1).double().pow(2).sum(1),
                               rtol=1e-4, atol=1e-8)


def test_cnn_strided_dilated_grouped_conv1d(tmp_path):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, dilation=2, padding=2, groups=3), nn.ReLU(),
        nn.Conv2d(6, 4, 2, stride=(1, 2), bias=False), nn.Flatten(), nn.LazyLinear(3))
    x = torch.randn(5, 4, 9, 9)
    model(x)  # materialize the lazy layer
    y = torch.randint(0, 3, (5,))
    probe = run_probe(model, nn.CrossEntropyLoss(), [(x, y)], tmp_path)
    check_against(probe, model, nn.CrossEntropyLoss(reduction="none"), [(x, y)])


def test_conv1d_conv3d_groupnorm_rmsnorm_bn_eval(tmp_path):
    torch.manual_seed(3)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(3, 4, 3, stride=2, dilation=2, padding=1)
            self.gn = nn.GroupNorm(2, 4)
            self.c3 = nn.Conv3d(1, 2, 2, padding="same")  # string padding: generic fallback
            self.bn = nn.BatchNorm1d(8)
            self.rms = nn.RMSNorm(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            h = self.gn(self.c1(x))  # [b, 4, 5]
            h = self.c3(h[:, None, :, :4].reshape(-1, 1, 2, 2, 4))  # [b, 2, 1, 1, 3]
            h = h.flatten(1)[:, :6]
            h = torch.cat([h, h[:, :2]], 1)
            h = self.rms(self.bn(h))
            return self.head(h)

    model = Net()
    model.bn.eval()  # running statistics: per-sample gradients exist
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(6, 3, 11), torch.randint(0, 2, (6,))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        probe = run_probe(model, nn.CrossEntropyLoss(), [(x, y)], tmp_path)
    check_against(probe, model, nn.CrossEntropyLoss(reduction="none"), [(x, y)])
    assert any("Conv3d" in str(m.message) and "fallback" in str(m.message) for m in w)


def test_conv3d_and_dilated_conv1d_rule(tmp_path):
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv3d(2, 4, (2, 3, 2), stride=(1, 2, 1), padding=1, dilation=(1, 1, 2), groups=2), nn.Tanh(),
                          nn.Flatten(2), nn.Conv1d(4, 3, 3, dilation=2, stride=2), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 2, 3, 5, 4)
    model(x)
    y = torch.randn(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: both convolutions have a rule
        probe = run_probe(model, nn.MSELoss(), [(x, y)], tmp_path)
    check_against(probe, model, nn.MSELoss(reduction="none"), [(x, y)], weights=torch.full((4,), 0.5))


def test_batchnorm_in_training_mode_is_reported_not_wrong(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    probe = run_probe(model, nn.CrossEntropyLoss(), [(x, y)], tmp_path)
    names = [n for n, _ in model.named_parameters()]
    assert set(probe.unsupported) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert all("BatchNorm in training mode" in r for r in probe.unsupported.values())
    assert torch.isnan(probe.sq[0]).all() and not torch.isnan(probe.sq[names.index("3.weight")]).any()


class TinyEncoder(nn.Module):
    def __init__(self, vocab=11, d=8, heads=2, tie=False, batch_first=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.0, batch_first=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, vocab)
        if tie:
            self.out.weight = self.emb.weight

    def forward(self, idx):
        h = self.layer(self.emb(idx))
        t = h.transpose(0, 1)
        a, _ = self.attn(t, t, t)
        return self.out(self.norm(h + a.transpose(0, 1)))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformer_encoder(tmp_path, reduction):
    torch.manual_seed(5)
    model = TinyEncoder()
    idx = torch.randint(0, 11, (4, 5))
    idx[0, 0] = 0  # a padding token
    y = torch.randint(0, 11, (4, 5))
    probe = run_probe(model, SeqCE(reduction), [(idx, y)], tmp_path)
    w = torch.full((4,), 1 / 5) if reduction == "mean" else None  # l_i = (b/N) sum_t ce_it, N = b*T
    check_against(probe, model, ce_seq_none, [(idx, y)], weights=w, rtol=2e-4, atol=2e-6)
    ref_l = per_sample_losses(probe.model_before, ce_seq_none, idx, y) * (w if w is not None else 1)
    torch.testing.assert_close(probe.losses, ref_l, rtol=1e-5, atol=1e-6)


def test_weight_tying_and_shared_module(tmp_path):
    torch.manual_seed(6)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight  # tied

        def forward(self, idx):
            h = self.emb(idx)
            h = self.lin(torch.tanh(self.lin(h)))  # same module twice: contributions add
            return self.out(h)

    model = Shared()
    idx, y = torch.randint(0, 7, (3, 4)), torch.randint(0, 7, (3, 4))
    probe = run_probe(model, SeqCE(), [(idx, y)], tmp_path)
    check_against(probe, model, ce_seq_none, [(idx, y)], weights=torch.full((3,), 1 / 4))


def test_unknown_module_uses_fallback_with_one_warning(tmp_path):
    torch.manual_seed(7)

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x * self.s + self.s.pow(2)

    model = nn.Sequential(nn.Linear(3, 3), Scale(), nn.Linear(3, 2))
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        probe = run_probe(model, nn.MSELoss(reduction="sum"), [(x, y)], tmp_path)
    check_against(probe, model, nn.MSELoss(reduction="none"), [(x, y)])
    assert sum("Scale" in str(m.message) for m in w) == 1


def test_untracked_steps_capture_nothing(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cp = cockpit_lite.watch(model, opt, loss_fn=nn.MSELoss(), logdir=tmp_path / "r",
                            quantities={"norm_test": "at:1"})
    for _ in range(3):
        opt.zero_grad()
        nn.MSELoss()(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
        assert cp._layer_capture is None or not cp._layer_capture.armed or cp.step == 1
        opt.step()
    cp.close()
    steps, vals = cockpit_lite.load(tmp_path / "r").series("norm_test")
    assert list(steps) == [1]


def test_ignore_index_mean_normaliser(tmp_path):
    """Mean cross-entropy with ignored tokens divides by the number of counted tokens N: l_i = (b/N) sum_t."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6))
    idx, y = torch.randint(0, 6, (3, 5)), torch.randint(0, 6, (3, 5))
    y[0, :3] = -100
    y[2, 4] = -100
    probe = run_probe(model, SeqCE(), [(idx, y)], tmp_path)
    N = int((y != -100).sum())
    w = torch.full((3,), 3 / N)
    check_against(probe, model, ce_seq_none, [(idx, y)], weights=w)
    ref_l = per_sample_losses(probe.model_before, ce_seq_none, idx, y) * w
    torch.testing.assert_close(probe.losses, ref_l, rtol=1e-5, atol=1e-6)
