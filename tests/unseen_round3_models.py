"""Round-3 probe (brief probe_models): losses with terms or couplings the layer hooks cannot see, embedding
options that mix samples, stock torchvision / torch.nn models at tiny sizes. Same harness as
tests/unseen_models.py (``Unseen`` + float64 ``reference``); ``Extra`` adds a term on the parameters to the
step's loss (an L2 penalty written in the loss): l_i = loss_i + penalty, g_i = grad loss_i + grad penalty.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

from unseen_models import D, V, TinyLM, Unseen, flat, labels, reference, seeded_cases, to_double, tokens


@dataclass
class Extra(Unseen):
    penalty: Optional[Callable] = None  # model -> a scalar added once to the step's loss

    def step_loss(self, model=None):
        m = model or self.model
        return super().step_loss(m) + self.penalty(m)


def l2(m):
    return 1e-3 * sum(p.pow(2).sum() for p in m.parameters())


def reference_extra(u: Extra, model: nn.Module):
    """The harness reference plus the penalty: every g_i gets grad(penalty), the loss gets its value."""
    loss, G, names = reference(u, model)
    m = copy.deepcopy(model).double()
    named = dict(m.named_parameters())
    pen = u.penalty(m)
    grads = torch.autograd.grad(pen, [named[n] for n in names])
    return loss + float(pen), [g + d.unsqueeze(0) for g, d in zip(G, grads)], names


class MLP(nn.Module):
    def __init__(self, d_in=5, d_out=3):
        super().__init__()
        self.a, self.b = nn.Linear(d_in, 6), nn.Linear(6, d_out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class LogSoftmaxMLP(MLP):
    def forward(self, x):
        return super().forward(x).log_softmax(-1)


class FreqEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, scale_grad_by_freq=True)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


class FreqLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, scale_grad_by_freq=True)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


class MaxNormEmb1(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, max_norm=1.0)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


class Conv1dSame(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 4, 3, padding="same")
        self.t = nn.ConvTranspose1d(4, 2, 3, stride=2)
        self.head = nn.Linear(2, 3)

    def forward(self, x):  # [B, 3, 6]
        h = self.t(torch.tanh(self.c(x)))
        return self.head(F.adaptive_avg_pool1d(torch.tanh(h), 1).squeeze(-1))


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv3d(2, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):  # [B, 2, 4, 4, 4]
        return self.head(self.pool(torch.tanh(self.c(x))).flatten(1))


class PixelUp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.c2 = nn.Conv2d(2, 2, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d((2, 2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, 3, 4, 4]
        h = self.ps(torch.tanh(self.c(x)))  # [B, 2, 8, 8]
        h = self.c2(self.up(h))  # [B, 2, 16, 16]
        return self.head(self.pool(torch.tanh(h)).flatten(1))


class Seq2Seq(nn.Module):
    """nn.Transformer, sequence-first [T, B, E], causal tgt mask; output [T, B, V]."""

    def __init__(self):
        super().__init__()
        self.src = nn.Embedding(V, D)
        self.tgt = nn.Embedding(V, D)
        self.tf = nn.Transformer(D, 2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16, dropout=0.0)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        s, t = x["src"].T, x["tgt"].T  # token ids [B, L] -> [L, B]
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[0])
        return self.head(self.tf(self.src(s), self.tgt(t), tgt_mask=mask))


class EncDec(nn.Module):
    """nn.TransformerEncoder memory into nn.TransformerDecoder (batch_first), causal mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        enc = nn.TransformerEncoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        dec = nn.TransformerDecoderLayer(D, 2, 16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(enc, 1, enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(dec, 1)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        mem = self.enc(self.emb(x["src"]))
        t = x["tgt"]
        mask = nn.Transformer.generate_square_subsequent_mask(t.shape[1])
        return self.head(self.dec(self.emb(t), mem, tgt_mask=mask, tgt_is_causal=True))


def same_dtype(o, y):  # a float64 reference: Huber's backward wants the target in the output's dtype
    return o, y.to(o.dtype)


def take_dict(x, i):
    return {k: v[i:i + 1] for k, v in x.items()}


def loss_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(11)
    xm = torch.randn(B, 5, generator=g)
    yk = torch.randn(B, 4, generator=g)
    ym = (torch.rand(B, 4, generator=g) > 0.5).float()
    soft = torch.softmax(torch.randn(B, 3, generator=g), -1)

    ce = nn.CrossEntropyLoss
    add("l2_in_loss", lambda: Extra("l2_in_loss", MLP(), ce(), [(xm, labels(B), 1.0)], penalty=l2))
    add("ce_class_weights_classifier", lambda: Unseen("ce_class_weights_classifier", MLP(),
                                                      ce(weight=torch.tensor([0.3, 1.0, 2.5])), [(xm, labels(B), 1.0)]))
    add("kl_batchmean", lambda: Unseen("kl_batchmean", LogSoftmaxMLP(), nn.KLDivLoss(reduction="batchmean"),
                                       [(xm, soft, 1.0)]))
    soft_lm = torch.softmax(torch.randn(B * 5, V, generator=g), -1)  # T = 5 (unseen_models.T)
    add("kl_batchmean_lm", lambda: Unseen("kl_batchmean_lm", TinyLM(), nn.KLDivLoss(reduction="batchmean"),
                                          [(tokens(B)[0], soft_lm, 1.0)],
                                          lambda o, y: (o.log_softmax(-1).view(-1, V), y.to(o.dtype))))
    add("nll_log_softmax", lambda: Unseen("nll_log_softmax", LogSoftmaxMLP(), nn.NLLLoss(), [(xm, labels(B), 1.0)]))
    add("bce_pos_weight_k", lambda: Unseen("bce_pos_weight_k", MLP(d_out=4),
                                           nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 1.0, 2.0, 4.0])),
                                           [(xm, ym, 1.0)]))
    add("mse_bk", lambda: Unseen("mse_bk", MLP(d_out=4), nn.MSELoss(), [(xm, yk, 1.0)]))
    add("huber_bk", lambda: Unseen("huber_bk", MLP(d_out=4), nn.HuberLoss(delta=0.5), [(xm, yk, 1.0)], same_dtype))
    add("smooth_l1_sum", lambda: Unseen("smooth_l1_sum", MLP(d_out=4), nn.SmoothL1Loss(reduction="sum"),
                                        [(xm, yk, 1.0)], same_dtype))

    def mixup():
        lam, perm = 0.7, torch.tensor([2, 0, 3, 1])[:B]
        y1 = F.one_hot(labels(B), 3).float()
        return Unseen("mixup_soft_ce", MLP(), ce(), [(lam * xm + (1 - lam) * xm[perm], lam * y1 + (1 - lam) * y1[perm], 1.0)])
    add("mixup_soft_ce", mixup)
    add("ce_weights_lm_accumulate", lambda: Unseen(
        "ce_weights_lm_accumulate", TinyLM(), ce(weight=torch.linspace(0.5, 2.0, V), ignore_index=-100),
        [(tokens(B)[0][:2], tokens(B)[1][:2], 0.5), (tokens(B)[0][2:], tokens(B)[1][2:], 0.5)], flat))
    return out


def embedding_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out: Dict[str, Callable[[], Unseen]] = {}
    x, _ = tokens(B, pad_y=False)
    x[:, 0] = 3  # a token every sample has: its count is B over the batch, 1 in a sample alone
    out["embedding_freq_classifier"] = lambda: (torch.manual_seed(0), Unseen(
        "embedding_freq_classifier", FreqEmb(), nn.CrossEntropyLoss(), [(x, labels(B), 1.0)]))[1]
    out["embedding_freq_lm"] = lambda: (torch.manual_seed(0), Unseen(
        "embedding_freq_lm", FreqLM(), nn.CrossEntropyLoss(ignore_index=-100), [(x, tokens(B)[1], 1.0)], flat))[1]
    out["embedding_max_norm_1"] = lambda: (torch.manual_seed(0), Unseen(
        "embedding_max_norm_1", MaxNormEmb1(), nn.CrossEntropyLoss(), [(x, labels(B), 1.0)]))[1]
    return out


def layer_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(13)
    x1 = torch.randn(B, 3, 6, generator=g)
    x3 = torch.randn(B, 2, 4, 4, 4, generator=g)
    x2 = torch.randn(B, 3, 4, 4, generator=g)
    src, _ = tokens(B, pad_y=False, seed=3)
    tgt, y = tokens(B, pad_y=True, seed=4)
    s2s = {"src": src, "tgt": tgt}

    ce = nn.CrossEntropyLoss
    add("conv1d_same_convtranspose1d", lambda: Unseen("conv1d_same_convtranspose1d", Conv1dSame(), ce(), [(x1, labels(B), 1.0)]))
    add("conv3d", lambda: Unseen("conv3d", Conv3dNet(), ce(), [(x3, labels(B), 1.0)]))
    add("pixel_shuffle_upsample", lambda: Unseen("pixel_shuffle_upsample", PixelUp(), ce(), [(x2, labels(B), 1.0)]))
    # [T, B, V] output: the loss reads it transposed back to batch-first
    add("transformer_seq_first", lambda: Unseen(
        "transformer_seq_first", Seq2Seq(), ce(ignore_index=-100), [(s2s, y, 1.0)],
        lambda o, y: (o.transpose(0, 1).reshape(-1, V), y.reshape(-1)), take=take_dict,
        size=lambda x: int(x["src"].shape[0])))
    add("transformer_seq_first_permute_loss", lambda: Unseen(
        "transformer_seq_first_permute_loss", Seq2Seq(), ce(ignore_index=-100), [(s2s, y, 1.0)],
        lambda o, y: (o.permute(1, 2, 0), y), take=take_dict, size=lambda x: int(x["src"].shape[0])))
    add("encoder_decoder", lambda: Unseen("encoder_decoder", EncDec(), ce(ignore_index=-100), [(s2s, y, 1.0)], flat,
                                          take=take_dict, size=lambda x: int(x["src"].shape[0])))
    return out


def vision_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    import torchvision

    out, add = seeded_cases()
    g = torch.Generator().manual_seed(17)
    x32 = torch.randn(B, 3, 32, 32, generator=g)
    x16 = torch.randn(B, 3, 16, 16, generator=g)

    def mnv3(train):
        def f():
            m = torchvision.models.mobilenet_v3_small(weights=None, num_classes=3)
            m.train(train)
            return Unseen(f"mobilenet_v3_small_{'train' if train else 'eval'}", m, nn.CrossEntropyLoss(),
                          [(x32, labels(B), 1.0)])
        return f
    add("mobilenet_v3_small_eval", mnv3(False))
    add("mobilenet_v3_small_train", mnv3(True))

    def vit():
        m = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=8,
                                                 mlp_dim=16, num_classes=3)
        nn.init.normal_(m.heads.head.weight, std=0.3)  # zero-initialised: every other gradient would be 0
        return Unseen("tv_vit", m, nn.CrossEntropyLoss(), [(x16, labels(B), 1.0)])
    add("tv_vit", vit)

    def effnet():
        m = torchvision.models.efficientnet_b0(weights=None, num_classes=3, stochastic_depth_prob=0.5)
        for mod in m.modules():  # BatchNorm frozen (eval), stochastic depth active (train)
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
        return Unseen("efficientnet_b0_stochastic_depth", m, nn.CrossEntropyLoss(), [(x32, labels(B), 1.0)])
    add("efficientnet_b0_stochastic_depth", effnet)

    def swin():
        from torchvision.models.swin_transformer import SwinTransformer
        m = SwinTransformer(patch_size=[2, 2], embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=[2, 2],
                            stochastic_depth_prob=0.0, num_classes=3)
        return Unseen("tv_swin", m, nn.CrossEntropyLoss(), [(x16, labels(B), 1.0)])
    add("tv_swin", swin)
    return out


def reference_tokens(u: Unseen, model: nn.Module, batch_first: Callable):
    """For a token-level CrossEntropyLoss (mean over the targets not ignored) on a model whose output
    ``batch_first(out)`` is [B, T, V]: l_i = B / N * sum of sample i's token losses, from a forward of sample i
    alone, float64 (the harness's splice assumes the batch on dim 0 of the output)."""
    (x, y, _), = u.micro
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in m.named_parameters() if p.requires_grad]
    B = u.size(x)
    N = int((y != u.loss_fn.ignore_index).sum())
    G = [torch.zeros(B, *p.shape, dtype=torch.float64) for p in params]
    total = 0.0
    for i in range(B):
        o = batch_first(u.call(m, u.take(x, i)))
        li = F.cross_entropy(o.reshape(-1, V), y[i].reshape(-1), ignore_index=u.loss_fn.ignore_index,
                             reduction="sum") * B / N
        total += float(li) / B
        for j, gr in enumerate(torch.autograd.grad(li, params, allow_unused=True)):
            if gr is not None:
                G[j][i] = gr
    return total, G, names


class PairEncoder(nn.Module):
    """Two embeddings per sample (two views), returned side by side [B, 2 * 4]."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):  # [B, 2, 5]
        z = F.normalize(self.b(torch.tanh(self.a(x))), dim=-1)
        return z.flatten(1)


def info_nce(o, y):
    """logits z1 @ z2.T / tau over the batch: every sample's loss depends on every other's output."""
    return o[:, :4] @ o[:, 4:].T / 0.1, y


def reference_rows(u: Unseen, model: nn.Module):
    """l_i = the loss of row i of a coupled loss (reduction 'none') on the whole batch, g_i = grad l_i
    (float64, one forward of the batch): the definition of QUANTITIES.md when the loss is a mean of rows."""
    (x, y, _), = u.micro
    m = copy.deepcopy(model).double()
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for _, p in m.named_parameters() if p.requires_grad]
    none = copy.deepcopy(u.loss_fn)
    none.reduction = "none"
    rows = none(*u.loss_input(u.call(m, to_double(x)), y))
    G = [torch.stack(gs) for gs in zip(*[torch.autograd.grad(r, params, retain_graph=True) for r in rows])]
    return float(rows.mean()), G, names


def coupled_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    g = torch.Generator().manual_seed(19)
    x = torch.randn(B, 2, 5, generator=g)

    def build():
        torch.manual_seed(0)
        return Unseen("info_nce", PairEncoder(), nn.CrossEntropyLoss(), [(x, torch.arange(B), 1.0)], info_nce)
    def cdist():
        torch.manual_seed(0)
        return Unseen("cdist", PairEncoder(), nn.CrossEntropyLoss(), [(x, torch.arange(B), 1.0)],
                      lambda o, y: (-torch.cdist(o[:, :4], o[:, 4:]) / 0.1, y))
    return {"info_nce": build, "cdist": cdist}


class StochasticDepthRecorder:
    """Patches torchvision's ``stochastic_depth``: while recording, each call's drawn mask [b, 1, 1, 1] is kept (the
    first ``n`` calls: the step's forward; the cockpit's replays draw the same masks again); while replaying, call
    k of a forward of sample i alone (``take``) or of the whole batch uses the step's mask (rows i or all)."""

    def __init__(self, n: int):
        import sys

        import torchvision.ops  # noqa: F401

        self.mod = sys.modules["torchvision.ops.stochastic_depth"]
        self.orig = self.mod.stochastic_depth
        self.n, self.masks, self.replay, self.sample, self.k = n, [], False, None, 0
        self.mod.stochastic_depth = self

    def __call__(self, input, p, mode, training=True):
        if not training or p == 0.0:
            return input
        if self.replay:
            mask = self.masks[self.k % self.n]
            self.k += 1
            mask = mask if self.sample is None else mask[self.sample:self.sample + 1]
            return input * mask.to(input.dtype)
        noise = torch.empty([input.shape[0]] + [1] * (input.ndim - 1), dtype=input.dtype).bernoulli_(1 - p).div_(1 - p)
        if len(self.masks) < self.n:
            self.masks.append(noise.detach().clone())
        return input * noise

    def start_replay(self):
        self.replay = True

    def take(self, x, i):
        self.sample, self.k = i, 0
        return x[i:i + 1]

    def call(self, m, x):
        if self.replay and x.shape[0] != 1:
            self.sample, self.k = None, 0
        return m(x)

    def close(self):
        self.mod.stochastic_depth = self.orig


class ManifoldMix(nn.Module):
    """Manifold mixup inside forward: hidden rows mixed with a permutation of the batch (drawn per call or fixed)."""

    def __init__(self, random: bool):
        super().__init__()
        self.random = random
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        perm = torch.randperm(x.shape[0]) if self.random else torch.arange(x.shape[0]).flip(0)
        return self.b(0.7 * h + 0.3 * h[perm])


class Triplet(nn.Module):
    """One encoder for anchor, positive and negative of a sample ([B, 3, 5] -> [B, 3, 4])."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def pair_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    """Losses whose other arguments are model outputs too (the 'target' is not a constant)."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(B, 3, 5, generator=g)
    sign = torch.tensor([1.0, -1.0, 1.0, -1.0])[:B]
    out, add = seeded_cases()

    add("triplet", lambda: Unseen("triplet", Triplet(), nn.TripletMarginLoss(margin=2.0), [(x, None, 1.0)],
                                  lambda o, y: (o[:, 0], o[:, 1], o[:, 2])))
    add("cosine_embedding", lambda: Unseen("cosine_embedding", Triplet(), nn.CosineEmbeddingLoss(margin=0.1),
                                           [(x, sign, 1.0)], lambda o, y: (o[:, 0], o[:, 1], y)))
    add("margin_ranking", lambda: Unseen("margin_ranking", Triplet(), nn.MarginRankingLoss(margin=0.5),
                                         [(x, sign, 1.0)], lambda o, y: (o[:, 0, 0], o[:, 1, 0], y)))
    return out


class KVAttention(nn.Module):
    """nn.MultiheadAttention with kdim/vdim (separate q/k/v projection weights), keys from another encoder."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, 6), nn.Linear(5, 4)
        self.att = nn.MultiheadAttention(8, 2, kdim=6, vdim=4, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # [B, L, 5]
        h = self.att(self.q(x), torch.tanh(self.k(x)), torch.tanh(self.v(x)), need_weights=False)[0]
        return self.head(h.mean(1))


class PaddingModes(nn.Module):
    """Conv2d with padding_mode='reflect' and 'circular', grouped dilated Conv1d."""

    def __init__(self):
        super().__init__()
        self.r = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
        self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.g = nn.Conv1d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # [B, 3, 4, 4]
        h = torch.tanh(self.c(torch.tanh(self.r(x))))
        h = torch.tanh(self.g(h.flatten(2)))
        return self.head(h.mean(-1))


def more_layer_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    g = torch.Generator().manual_seed(29)
    xs = torch.randn(B, 3, 5, generator=g)
    x2 = torch.randn(B, 3, 4, 4, generator=g)
    x, y = tokens(B)
    out, add = seeded_cases()

    add("mha_kdim_vdim", lambda: Unseen("mha_kdim_vdim", KVAttention(), nn.CrossEntropyLoss(), [(xs, labels(B), 1.0)]))
    add("padding_modes", lambda: Unseen("padding_modes", PaddingModes(), nn.CrossEntropyLoss(), [(x2, labels(B), 1.0)]))
    # reduction='sum' divided by the token count in the loop (the Hugging Face num_items_in_batch way)
    n = int((y != -100).sum())
    add("sum_over_tokens", lambda: Unseen("sum_over_tokens", TinyLM(), nn.CrossEntropyLoss(reduction="sum"),
                                          [(x, y, 1.0 / n)], flat))
    return out
