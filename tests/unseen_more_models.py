"""More models for tests/persample/test_real_models_unseen.py (same harness, ``unseen_models.Unseen``): other losses and
layer types, GPTs with the loss inline, B == T, batch-mixing forwards, gradient checkpointing, stacked views, packed sequences."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from torch.nn import functional as F

from unseen_models import D, T, V, NormGPT, RelBiasAttn, TinyLM, Unseen, flat, labels, seeded_cases, tokens

class Siamese(nn.Module):
    """One encoder called twice per sample (two views), outputs concatenated."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.cat([self.enc(x[:, 0]), self.enc(x[:, 1])], dim=1))


class ConvZoo(nn.Module):
    """Depthwise (groups) and dilated Conv2d, ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.dil = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
        self.up = nn.ConvTranspose2d(6, 2, 2, stride=2)
        self.head = nn.Linear(2 * 8 * 8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.up(torch.tanh(self.dil(torch.tanh(self.dw(x)))))).flatten(1))


class BatchCentered(nn.Module):
    """Centres features over the batch by hand (samples mix, as in BatchNorm without the module)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h - h.mean(0, keepdim=True))


class MaxNormEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, max_norm=0.5)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        return self.head(self.emb(idx).mean(1))


def more_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(5)

    def shift(style):
        def f():
            x, y = tokens(B)
            m = TinyLM()
            if style == "inline":
                li = lambda o, y: (o[:, :-1].contiguous().view(-1, V), y[:, 1:].contiguous().view(-1))
                return Unseen("hf_shift_inline", m, nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)], li)
            kept = {}

            def call(m, x):
                kept["o"] = m(x)
                return kept["o"]
            li = lambda o, y: (o[:, :-1].contiguous().view(-1, V), y[:, 1:].contiguous().view(-1))
            return Unseen("hf_shift_kept", m, nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)], li, call=call)
        return f
    add("hf_shift_inline", shift("inline"))
    add("hf_shift_kept", shift("kept"))
    xs = torch.randn(B, T, 5, generator=g)
    ys = torch.randn(B, T, generator=g)
    add("mse_per_position", lambda: Unseen("mse_per_position", nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 1)),
                                           nn.MSELoss(), [(xs, ys, 1.0)], lambda o, y: (o.squeeze(-1), y)))
    xm = torch.randn(B, 5, generator=g)
    ym = (torch.rand(B, 4, generator=g) > 0.5).float()
    add("bce_multilabel_pos_weight", lambda: Unseen(
        "bce_multilabel_pos_weight", nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([1.0, 2.0, 0.5, 3.0])), [(xm, ym, 1.0)]))
    x2 = torch.randn(B, 2, 5, generator=g)
    add("siamese", lambda: Unseen("siamese", Siamese(), nn.CrossEntropyLoss(), [(x2, labels(B), 1.0)]))
    ximg = torch.randn(B, 4, 4, 4, generator=g)
    add("conv_zoo", lambda: Unseen("conv_zoo", ConvZoo(), nn.CrossEntropyLoss(), [(ximg, labels(B), 1.0)]))
    add("batch_centered", lambda: Unseen("batch_centered", BatchCentered(), nn.CrossEntropyLoss(), [(xm, labels(B), 1.0)]))
    xt, _ = tokens(B, pad_y=False)
    add("embedding_max_norm", lambda: Unseen("embedding_max_norm", MaxNormEmb(), nn.CrossEntropyLoss(), [(xt, labels(B), 1.0)]))
    return out


class Chunked(nn.Module):
    """Processes the batch in two chunks (memory saving), concatenates."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        return torch.cat([self.b(torch.tanh(self.a(c))) for c in x.chunk(2)])


class TwoViews(nn.Module):
    """Stacks two augmented views along the batch ([2B, ...]) and averages the logits of the two."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        z = torch.cat([x, x.flip(-1)])
        o = self.b(torch.tanh(self.a(z)))
        return 0.5 * (o[: x.shape[0]] + o[x.shape[0]:])


class Checkpointed(nn.Module):
    """torch.utils.checkpoint around a block (Hugging Face gradient_checkpointing)."""

    def __init__(self, reentrant=False):
        super().__init__()
        self.reentrant = reentrant
        self.emb = nn.Embedding(V, D)
        self.block = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        from torch.utils.checkpoint import checkpoint

        h = self.emb(idx)
        h = h + checkpoint(self.block, h, use_reentrant=self.reentrant)
        return self.head(h)


class PackedLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.rnn = nn.LSTM(D, D, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        idx, lengths = x["idx"], x["lengths"]
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(idx), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.rnn(packed)
        return self.head(h[-1])


def training_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    g = torch.Generator().manual_seed(7)
    xm = torch.randn(B, 5, generator=g)

    add("chunked_forward", lambda: Unseen("chunked_forward", Chunked(), nn.CrossEntropyLoss(), [(xm, labels(B), 1.0)]))
    add("two_views", lambda: Unseen("two_views", TwoViews(), nn.CrossEntropyLoss(), [(xm, labels(B), 1.0)]))
    for reentrant in (False, True):
        def ck(reentrant=reentrant):
            x, y = tokens(B)
            return Unseen(f"checkpoint_{'reentrant' if reentrant else 'plain'}", Checkpointed(reentrant),
                          nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)], flat)
        add(f"checkpoint_{'reentrant' if reentrant else 'plain'}", ck)

    def ck_accumulate():  # the recomputation of micro-batch k runs in backward k, after forward k ended
        x, y = tokens(B)
        micro = [(x[:2], y[:2], 0.5), (x[2:], y[2:], 0.5)]
        return Unseen("checkpoint_reentrant_accumulate", Checkpointed(True), nn.CrossEntropyLoss(ignore_index=-100),
                      micro, flat)
    add("checkpoint_reentrant_accumulate", ck_accumulate)

    def lengths():  # micro-batches of different sequence lengths (position embeddings on arange(T_k))
        from real_models import TinyGPT

        x, y = tokens(B)
        micro = [(x[:2], y[:2], 0.5), (x[2:, :3].contiguous(), y[2:, :3].contiguous(), 0.5)]
        return Unseen("accumulate_lengths", TinyGPT("arange", "module"), nn.CrossEntropyLoss(ignore_index=-100), micro, flat)
    add("accumulate_lengths", lengths)

    def packed():
        x, _ = tokens(B, pad_y=False, pad_x=0)
        lens = (x != 0).sum(1)
        return Unseen("packed_lstm", PackedLSTM(), nn.CrossEntropyLoss(), [({"idx": x, "lengths": lens}, labels(B), 1.0)],
                      size=lambda x: int(x["idx"].shape[0]))
    add("packed_lstm", packed)
    return out


def lm_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    """tests/real_models.py's GPTs with the loss written inline (the model output not kept in a variable)."""
    from real_models import TinyGPT, lm_tokens

    class BiasedTie(TinyGPT):  # F.linear(h, wte.weight, bias): the output is a view of the [B*T, V] addmm
        def __init__(self):
            super().__init__("arange", "functional")
            self.out_bias = nn.Parameter(torch.zeros(V))

        def forward(self, idx):
            L = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(L))
            for b in self.blocks:
                x = b(x)
            return F.linear(self.ln_f(x), self.wte.weight, self.out_bias)

    out: Dict[str, Callable[[], Unseen]] = {}

    def biased():
        torch.manual_seed(0)
        x, y = lm_tokens(B)
        return Unseen("inline_gpt_biased_tie", BiasedTie(), nn.CrossEntropyLoss(), [(x, y, 1.0)],
                      lambda o, y: (o.view(-1, o.shape[-1]), y.view(-1)))
    out["inline_gpt_biased_tie"] = biased

    def temperature():  # logits / 2 before the loss: no replay reproduces the loss, the self-check cannot run
        torch.manual_seed(0)
        x, y = lm_tokens(B)
        return Unseen("temperature_gpt_biased_tie", BiasedTie(), nn.CrossEntropyLoss(), [(x, y, 1.0)],
                      lambda o, y: ((o / 2.0).view(-1, o.shape[-1]), y.view(-1)))
    out["temperature_gpt_biased_tie"] = temperature
    for positions, tie in (("arange", "module"), ("arange", "functional"), ("param", None), ("ids", "module")):
        def build(positions=positions, tie=tie):
            torch.manual_seed(0)
            x, y = lm_tokens(B)
            return Unseen(f"inline_gpt_{positions}_{tie}", TinyGPT(positions, tie), nn.CrossEntropyLoss(), [(x, y, 1.0)],
                          lambda o, y: (o.view(-1, o.shape[-1]), y.view(-1)))
        out[f"inline_gpt_{positions}_{tie}"] = build
    return out


def coincidence_cases() -> Dict[str, Callable[[], Unseen]]:
    """B == T: a module called without the batch dimension has as many rows as the batch (no shape tells)."""
    out: Dict[str, Callable[[], Unseen]] = {}
    for style in ("kept", "inline"):
        for model in ("rel_bias", "rmsnorm_gpt"):
            def build(style=style, model=model):
                torch.manual_seed(0)
                x, y = tokens(T, pad_x=0 if model == "rmsnorm_gpt" else None)
                m = RelBiasAttn("embedding") if model == "rel_bias" else NormGPT("rms")
                if style == "inline":
                    return Unseen(f"b_eq_t_{model}_{style}", m, nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)], flat)
                kept = {}

                def call(m, x):  # the loop keeps the output: logits = model(x); crit(logits.view(-1, V), ...)
                    kept["logits"] = m(x)
                    return kept["logits"]
                return Unseen(f"b_eq_t_{model}_{style}", m, nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)], flat,
                              call=call)
            out[f"b_eq_t_{model}_{style}"] = build
    return out



class LoRALinear(nn.Module):
    """A frozen base Linear plus a low-rank update through bare parameters and matmuls (LoRA)."""

    def __init__(self, d_in, d_out, r=2):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.base.weight.requires_grad_(False)
        self.A = nn.Parameter(0.3 * torch.randn(r, d_in))
        self.B = nn.Parameter(0.3 * torch.randn(d_out, r))

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


class LayerZoo(nn.Module):
    """PReLU, GroupNorm, InstanceNorm1d(affine), LayerNorm(bias=False), Bilinear, a weight_norm Linear."""

    def __init__(self, parametrize="weight_norm"):
        super().__init__()
        self.lora = LoRALinear(5, 6)
        self.act = nn.PReLU(6)
        self.gn = nn.GroupNorm(2, 6)
        self.inorm = nn.InstanceNorm1d(6, affine=True)
        self.ln = nn.LayerNorm(6, bias=False)
        self.bil = nn.Bilinear(6, 6, 4)
        lin = nn.Linear(4, 3)
        if parametrize == "weight_norm":
            lin = nn.utils.parametrizations.weight_norm(lin)
        elif parametrize == "spectral_norm":
            lin = nn.utils.parametrizations.spectral_norm(lin)
        self.head = lin

    def forward(self, x):  # x [B, L, 5]
        h = self.act(self.lora(x).transpose(1, 2))  # [B, 6, L]: PReLU's channels on dim 1
        h = self.gn(h)
        h = self.inorm(torch.tanh(h)).transpose(1, 2)  # [B, L, 6] (tanh: GroupNorm's bias is not cancelled)
        h = self.ln(h).mean(1)
        return self.head(torch.tanh(self.bil(h, h)))


def layer_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out: Dict[str, Callable[[], Unseen]] = {}
    g = torch.Generator().manual_seed(9)
    x = torch.randn(B, 3, 5, generator=g)
    for par in ("none", "weight_norm"):
        def build(par=par):
            torch.manual_seed(0)
            return Unseen(f"layer_zoo_{par}", LayerZoo(par), nn.CrossEntropyLoss(), [(x, labels(B), 1.0)])
        out[f"layer_zoo_{par}"] = build
    return out


class PromptGPT(nn.Module):
    """forward(idx, prompt): a shared prompt [P, D] (not per sample) prepended to every sequence; learned
    positions on arange(P + T) (replayed per sample). With P == B the prompt's dim 0 looks like a batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.pos = nn.Embedding(2 * T + 4, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx, prompt, scale=1.0):
        B, L = idx.shape
        h = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), self.emb(idx)], dim=1)
        h = h + self.pos(torch.arange(h.shape[1]))
        return self.head(torch.tanh(self.mix(h) * scale))[:, prompt.shape[0]:]


def argument_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out: Dict[str, Callable[[], Unseen]] = {}
    for P in (B, 3):
        def build(P=P):
            torch.manual_seed(0)
            x, y = tokens(B)
            prompt = torch.randn(P, D, generator=torch.Generator().manual_seed(4))
            return Unseen(f"prompt_{P}", PromptGPT(), nn.CrossEntropyLoss(ignore_index=-100), [(x, y, 1.0)],
                          lambda o, y: (o.reshape(-1, V), y.reshape(-1)), call=lambda m, x: m(x, prompt, scale=0.7))
        out[f"prompt_{P}"] = build
    return out


class SparseEmbBN(nn.Module):
    """nn.Embedding(sparse=True) (sparse .grad) and a BatchNorm1d kept in eval mode while the model trains."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D, sparse=True)
        self.bn = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        return self.head(torch.relu(self.bn(self.emb(idx).mean(1))))


def sparse_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    def build():
        torch.manual_seed(0)
        m = SparseEmbBN()
        m.bn.eval()
        x, _ = tokens(B, pad_y=False)
        return Unseen("sparse_embedding_frozen_bn", m, nn.CrossEntropyLoss(), [(x, labels(B), 1.0)])
    return {"sparse_embedding_frozen_bn": build}
