"""Round-5 probe B (tests/persample/test_unseen_round5b.py): losses, parametrizations and loops written the usual way
that earlier rounds had not tried, in the harness of tests/unseen_models.py (``Unseen`` + the float64 ``reference``,
which needs no definition of l_i: sample i's gradient is B times the step loss's gradient with the other samples'
outputs detached, so weighted means, ignored pixels and soft targets need no special case in the reference).

Losses: CE with probability targets under class weights / label smoothing (PyTorch divides a weighted soft-target
mean by B, a weighted class-index mean by the targets' weights), BCEWithLogitsLoss(weight=), KLDivLoss(batchmean,
log_target=True) from a frozen teacher, NLLLoss(weight=), GaussianNLLLoss with a given or a predicted variance, CE
with ignore_index (and class weights) on [B, C, H, W] segmentation logits. Parametrizations: orthogonal (matrix_exp
and Householder), spectral_norm (a power iteration per training forward), a tied weight that one layer reads through
a parametrization and another reads raw."""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from unseen_models import Unseen, labels, reference, seeded_cases

C = 3


class MLP(nn.Module):
    def __init__(self, d_in=5, d_out=C, hidden=6):
        super().__init__()
        self.a, self.b = nn.Linear(d_in, hidden), nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class LogSoftmaxMLP(MLP):
    def forward(self, x):
        return F.log_softmax(super().forward(x), -1)


class TwoHeads(nn.Module):
    """(mean, variance) heads for GaussianNLLLoss: the variance through softplus."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 6)
        self.mu, self.var = nn.Linear(6, 2), nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.mu(h), F.softplus(self.var(h)) + 1e-3


class RawTwoHeads(TwoHeads):
    """(mean, raw variance): the loop applies softplus."""

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.mu(h), self.var(h)


class SegNet(nn.Module):
    """Per-pixel classifier: [B, 2, H, W] -> [B, C, H, W] logits."""

    def __init__(self, classes=C):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, classes, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


class ParamMLP(nn.Module):
    """5 -> 6 -> (6 -> 6 parametrized) -> 3."""

    def __init__(self, kind):
        super().__init__()
        self.a = nn.Linear(5, 6)
        mid = nn.Linear(6, 6) if kind != "householder" else nn.Linear(6, 4)
        if kind in ("matrix_exp", "cayley", "householder"):
            mid = nn.utils.parametrizations.orthogonal(mid, orthogonal_map=kind)
        elif kind == "spectral_norm":
            mid = nn.utils.parametrizations.spectral_norm(mid)
        self.mid = mid
        self.b = nn.Linear(mid.out_features, C)

    def forward(self, x):
        return self.b(torch.tanh(self.mid(torch.tanh(self.a(x)))))


class LoRAParam(nn.Module):
    """minLoRA-style: weight = original + B A, A and B the parametrization's own parameters."""

    def __init__(self, out_f, in_f, r=2):
        super().__init__()
        self.A = nn.Parameter(0.3 * torch.randn(r, in_f))
        self.B = nn.Parameter(0.3 * torch.randn(out_f, r))

    def forward(self, w):
        return w + self.B @ self.A


class LoRAMLP(nn.Module):
    """The first Linear's weight parametrized by LoRAParam (its original frozen or trained); 6 rows, as many as B."""

    def __init__(self, freeze=True):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, C)
        parametrize.register_parametrization(self.a, "weight", LoRAParam(6, 5))
        self.a.parametrizations.weight.original.requires_grad_(not freeze)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class CachedTwice(nn.Module):
    """An orthogonal Linear applied twice under ``parametrize.cached()`` (its weight computed once per forward)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.mid = nn.utils.parametrizations.orthogonal(nn.Linear(6, 6))
        self.b = nn.Linear(6, C)

    def forward(self, x):
        with parametrize.cached():
            h = torch.tanh(self.mid(torch.tanh(self.a(x))))
            return self.b(torch.tanh(self.mid(h)))


class HookNormMLP(nn.Module):
    """The old hook-based ``torch.nn.utils.spectral_norm`` / ``weight_norm`` (or the parametrization's weight_norm, the
    reference twin): ``weight`` recomputed from ``weight_orig`` (``weight_g``, ``weight_v``) before each call, u
    updated in place in training mode."""

    def __init__(self, kind="spectral_norm"):
        super().__init__()
        self.a = nn.Linear(5, 6)
        wrap = {"spectral_norm": torch.nn.utils.spectral_norm, "weight_norm": torch.nn.utils.weight_norm,
                "parametrized_weight_norm": nn.utils.parametrizations.weight_norm}[kind]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the hook-based ones are deprecated
            self.mid = wrap(nn.Linear(6, 6))
        self.b = nn.Linear(6, C)

    def forward(self, x):
        return self.b(torch.tanh(self.mid(torch.tanh(self.a(x)))))


class UnitRows(nn.Module):
    """Rows of unit norm (normalised embeddings)."""

    def forward(self, w):
        return w / w.norm(dim=1, keepdim=True)


class TiedParamLM(nn.Module):
    """head.weight = emb.weight, then the embedding's weight parametrized (unit rows): the head reads the raw tensor
    (now ``emb.parametrizations.weight.original``), the embedding reads it through the parametrization."""

    def __init__(self, V=7, D=4):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        parametrize.register_parametrization(self.emb, "weight", UnitRows())

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx)))).mean(1)


class TransposeOf(nn.Module):
    """A decoder weight that is the encoder's transposed (the tied autoencoder written as a parametrization): the
    decoder's own ``original`` is unused."""

    def __init__(self, enc):
        super().__init__()
        self.enc = [enc]  # not a submodule: the encoder's weight stays named once

    def forward(self, w):
        return self.enc[0].weight.T


class TiedAutoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 3)
        self.dec = nn.Linear(3, 5)
        self.dec.weight.requires_grad_(False)  # replaced by the encoder's transpose
        parametrize.register_parametrization(self.dec, "weight", TransposeOf(self.enc), unsafe=True)

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def sequential_spectral_norm(hook=False):
    """nn.Sequential with a spectral-normalised middle Linear (a GAN discriminator's form)."""
    wrap = torch.nn.utils.spectral_norm if hook else nn.utils.parametrizations.spectral_norm
    mid = wrap(nn.Linear(6, 6))
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), mid, nn.Tanh(), nn.Linear(6, C))


class EMACenter(nn.Module):
    """Centres by a running mean that the training forward updates (with the detached batch mean) before using it."""

    def __init__(self, d, momentum=0.5):
        super().__init__()
        self.m = momentum
        self.register_buffer("mean", torch.zeros(d))

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                self.mean.mul_(1 - self.m).add_(self.m * x.mean(0))
        return x - self.mean


def spectral_reference(u: Unseen, model: nn.Module):
    """spectral_norm in training mode runs one power iteration per forward and divides by the sigma of the updated
    vectors: the reference is taken in eval mode from a copy that ran the step's one training forward."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for x, _, _ in u.micro:
            m(x)
    m.eval()
    return reference(u, m)


def loss_cases(B: int = 6) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(51)
    x = torch.randn(B, 5, generator=g)
    soft = torch.softmax(2 * torch.randn(B, C, generator=g), -1)
    w = torch.tensor([0.3, 1.0, 2.5])
    multi = (torch.rand(B, 4, generator=g) > 0.5).float()
    yreg = torch.randn(B, 2, generator=g)
    var = 0.5 + torch.rand(B, 2, generator=g)
    seg_x = torch.randn(B, 2, 3, 4, generator=g)
    seg_y = torch.randint(0, C, (B, 3, 4), generator=g)
    seg_y[torch.rand(B, 3, 4, generator=g) < 0.3] = 255
    seg_y[1, :2] = 255  # sample 1: 8 of its 12 pixels or more ignored
    ce = nn.CrossEntropyLoss

    add("ce_soft_targets_weight", lambda: Unseen("ce_soft_targets_weight", MLP(), ce(weight=w), [(x, soft, 1.0)]))
    add("ce_soft_targets_smoothing", lambda: Unseen("ce_soft_targets_smoothing", MLP(), ce(label_smoothing=0.1),
                                                    [(x, soft, 1.0)]))
    add("ce_soft_targets_weight_smoothing", lambda: Unseen(
        "ce_soft_targets_weight_smoothing", MLP(), ce(weight=w, label_smoothing=0.2), [(x, soft, 1.0)]))
    add("ce_weight_smoothing_classifier", lambda: Unseen(
        "ce_weight_smoothing_classifier", MLP(), ce(weight=w, label_smoothing=0.1), [(x, labels(B), 1.0)]))
    add("bce_weight_classes", lambda: Unseen(
        "bce_weight_classes", MLP(d_out=4), nn.BCEWithLogitsLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.5])),
        [(x, multi, 1.0)]))
    add("bce_weight_per_sample", lambda: Unseen(
        "bce_weight_per_sample", MLP(d_out=4), nn.BCEWithLogitsLoss(weight=torch.linspace(0.2, 2.0, B)[:, None]),
        [(x, multi, 1.0)]))
    add("bce_weight_and_pos_weight", lambda: Unseen(
        "bce_weight_and_pos_weight", MLP(d_out=4),
        nn.BCEWithLogitsLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.5]), pos_weight=torch.tensor([2.0, 0.5, 1.0, 4.0])),
        [(x, multi, 1.0)]))

    def teacher_logp():
        torch.manual_seed(7)
        teacher = MLP().requires_grad_(False)
        with torch.no_grad():
            return F.log_softmax(teacher(x) / 2.0, -1)

    add("kl_log_target", lambda: Unseen("kl_log_target", LogSoftmaxMLP(),
                                        nn.KLDivLoss(reduction="batchmean", log_target=True), [(x, teacher_logp(), 1.0)]))
    add("kl_mean_elementwise", lambda: Unseen("kl_mean_elementwise", LogSoftmaxMLP(), nn.KLDivLoss(reduction="mean"),
                                              [(x, teacher_logp().exp(), 1.0)]))
    # distillation as usually written: T^2 * KL(log_softmax(s / T) || softmax(t / T)) on the student's raw logits
    add("kl_distill_temperature", lambda: Unseen(
        "kl_distill_temperature", MLP(), nn.KLDivLoss(reduction="batchmean"), [(x, teacher_logp().exp(), 4.0)],
        lambda o, y: (F.log_softmax(o / 2.0, -1), y.to(o.dtype))))
    add("nll_weight", lambda: Unseen("nll_weight", LogSoftmaxMLP(), nn.NLLLoss(weight=w), [(x, labels(B), 1.0)]))
    add("gaussian_nll_given_var", lambda: Unseen(
        "gaussian_nll_given_var", MLP(d_out=2), nn.GaussianNLLLoss(), [(x, (yreg, var), 1.0)],
        lambda o, y: (o, y[0].to(o.dtype), y[1].to(o.dtype))))
    add("gaussian_nll_full_shared_var", lambda: Unseen(
        "gaussian_nll_full_shared_var", MLP(d_out=2), nn.GaussianNLLLoss(full=True), [(x, (yreg, var[:, :1]), 1.0)],
        lambda o, y: (o, y[0].to(o.dtype), y[1].to(o.dtype))))
    add("gaussian_nll_predicted_var", lambda: Unseen(
        "gaussian_nll_predicted_var", TwoHeads(), nn.GaussianNLLLoss(), [(x, yreg, 1.0)],
        lambda o, y: (o[0], y.to(o[0].dtype), o[1])))
    add("gaussian_nll_var_in_loop", lambda: Unseen(
        "gaussian_nll_var_in_loop", RawTwoHeads(), nn.GaussianNLLLoss(), [(x, yreg, 1.0)],
        lambda o, y: (o[0], y.to(o[0].dtype), F.softplus(o[1]) + 1e-3)))
    add("gaussian_nll_one_output", lambda: Unseen(
        "gaussian_nll_one_output", MLP(d_out=4), nn.GaussianNLLLoss(), [(x, yreg, 1.0)],
        lambda o, y: (o[:, :2], y.to(o.dtype), F.softplus(o[:, 2:]) + 1e-3)))
    add("seg_ce_ignore_index", lambda: Unseen("seg_ce_ignore_index", SegNet(), ce(ignore_index=255),
                                              [(seg_x, seg_y, 1.0)]))
    add("seg_ce_weight_ignore_index", lambda: Unseen("seg_ce_weight_ignore_index", SegNet(),
                                                     ce(weight=w, ignore_index=255), [(seg_x, seg_y, 1.0)]))
    add("seg_ce_weight_ignore_smoothing", lambda: Unseen(
        "seg_ce_weight_ignore_smoothing", SegNet(), ce(weight=w, ignore_index=255, label_smoothing=0.1),
        [(seg_x, seg_y, 1.0)]))
    return out


class SeqLM(nn.Module):
    """[B, T] tokens -> [B, T, V] log-probabilities (a student for KL distillation on unflattened outputs)."""

    def __init__(self, V=7, D=4):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)

    def forward(self, idx):
        return F.log_softmax(self.head(torch.tanh(self.emb(idx))), -1)


def more_loss_cases(B: int = 6) -> Dict[str, Callable[[], Unseen]]:
    """Shapes and broadcasts: KLDivLoss(batchmean) on [B, T, V] (divides by B, not B * T), MSELoss of a [B, 1] output
    against a [B] target (broadcast to [B, B]: every output meets every target), GaussianNLLLoss with one variance per
    sample for a [B, 2] mean, BCEWithLogitsLoss(pos_weight) on [B, 1, H, W] masks, CE with probability targets on
    [B, C, H, W], a sample whose pixels are all ignored, MultiLabelSoftMarginLoss(weight), PoissonNLLLoss."""
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(54)
    x = torch.randn(B, 5, generator=g)
    idx = torch.randint(0, 7, (B, 4), generator=g)
    teacher = torch.softmax(torch.randn(B, 4, 7, generator=g), -1)
    yreg = torch.randn(B, 2, generator=g)
    var_b = 0.5 + torch.rand(B, generator=g)
    seg_x = torch.randn(B, 2, 3, 4, generator=g)
    masks = (torch.rand(B, 1, 3, 4, generator=g) > 0.6).float()
    soft_seg = torch.softmax(torch.randn(B, C, 3, 4, generator=g), 1)
    seg_y = torch.randint(0, C, (B, 3, 4), generator=g)
    seg_y[2] = 255  # every pixel of sample 2 ignored
    multi = (torch.rand(B, 4, generator=g) > 0.5).float()
    counts = torch.poisson(2 * torch.rand(B, 3, generator=g))

    add("kl_batchmean_3d", lambda: Unseen("kl_batchmean_3d", SeqLM(), nn.KLDivLoss(reduction="batchmean"),
                                          [(idx, teacher, 1.0)], lambda o, y: (o, y.to(o.dtype))))
    add("mse_broadcast_b1_b", lambda: Unseen("mse_broadcast_b1_b", MLP(d_out=1), nn.MSELoss(), [(x, yreg[:, 0], 1.0)],
                                             lambda o, y: (o, y.to(o.dtype))))
    add("gaussian_nll_var_per_sample", lambda: Unseen(
        "gaussian_nll_var_per_sample", MLP(d_out=2), nn.GaussianNLLLoss(), [(x, (yreg, var_b), 1.0)],
        lambda o, y: (o, y[0].to(o.dtype), y[1].to(o.dtype))))
    add("seg_bce_pos_weight", lambda: Unseen("seg_bce_pos_weight", SegNet(1), nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor([3.0]).view(1, 1, 1)), [(seg_x, masks, 1.0)]))
    add("seg_ce_soft_targets", lambda: Unseen("seg_ce_soft_targets", SegNet(), nn.CrossEntropyLoss(label_smoothing=0.1),
                                              [(seg_x, soft_seg, 1.0)]))
    add("seg_ce_sample_all_ignored", lambda: Unseen("seg_ce_sample_all_ignored", SegNet(),
                                                    nn.CrossEntropyLoss(weight=torch.tensor([0.3, 1.0, 2.5]),
                                                                        ignore_index=255), [(seg_x, seg_y, 1.0)]))
    add("multilabel_soft_margin_weight", lambda: Unseen(
        "multilabel_soft_margin_weight", MLP(d_out=4),
        nn.MultiLabelSoftMarginLoss(weight=torch.tensor([0.2, 1.0, 3.0, 0.5])), [(x, multi, 1.0)]))
    add("poisson_nll", lambda: Unseen("poisson_nll", MLP(), nn.PoissonNLLLoss(), [(x, counts, 1.0)]))
    return out


def parametrization_cases(B: int = 6) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(52)
    x = torch.randn(B, 5, generator=g)
    idx = torch.randint(0, 7, (B, 3), generator=g)
    for kind in ("matrix_exp", "cayley", "householder", "spectral_norm"):
        add(f"param_{kind}", lambda kind=kind: Unseen(f"param_{kind}", ParamMLP(kind), nn.CrossEntropyLoss(),
                                                      [(x, labels(B), 1.0)]))
    for freeze in (True, False):
        add(f"lora_parametrization_{'frozen' if freeze else 'trained'}", lambda freeze=freeze: Unseen(
            "lora_parametrization", LoRAMLP(freeze), nn.CrossEntropyLoss(), [(x, labels(B), 1.0)]))
    add("orthogonal_cached_twice", lambda: Unseen("orthogonal_cached_twice", CachedTwice(), nn.CrossEntropyLoss(),
                                                  [(x, labels(B), 1.0)]))
    add("hook_spectral_norm", lambda: Unseen("hook_spectral_norm", HookNormMLP(), nn.CrossEntropyLoss(),
                                             [(x, labels(B), 1.0)]))
    add("tied_through_parametrization", lambda: Unseen("tied_through_parametrization", TiedParamLM(),
                                                       nn.CrossEntropyLoss(), [(idx, labels(B, 7), 1.0)]))
    add("tied_transpose_parametrization", lambda: Unseen("tied_transpose_parametrization", TiedAutoencoder(),
                                                         nn.MSELoss(), [(x, x.flip(1), 1.0)]))
    return out


def accumulation_cases() -> Dict[str, Callable[[], Unseen]]:
    """Four micro-batches of 3, 3, 3 and 1 samples, each loss divided by 4 (``loss / accum_steps``)."""
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(53)
    sizes = (3, 3, 3, 1)
    xs = [torch.randn(b, 5, generator=g) for b in sizes]
    ys = [torch.randint(0, C, (b,), generator=g) for b in sizes]
    soft = [torch.softmax(torch.randn(b, C, generator=g), -1) for b in sizes]
    w = torch.tensor([0.3, 1.0, 2.5])
    add("accumulate_4_unequal", lambda: Unseen("accumulate_4_unequal", MLP(), nn.CrossEntropyLoss(),
                                               [(a, b, 0.25) for a, b in zip(xs, ys)]))
    add("accumulate_4_unequal_weight", lambda: Unseen("accumulate_4_unequal_weight", MLP(),
                                                      nn.CrossEntropyLoss(weight=w),
                                                      [(a, b, 0.25) for a, b in zip(xs, ys)]))
    add("accumulate_4_unequal_soft", lambda: Unseen("accumulate_4_unequal_soft", MLP(),
                                                    nn.CrossEntropyLoss(label_smoothing=0.1),
                                                    [(a, b, 0.25) for a, b in zip(xs, soft)]))
    return out
