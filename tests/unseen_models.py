"""Models the tests had not seen (issue 19/20 probe): builders and an independent float64 reference.

Each builder returns an ``Unseen``: model, loss module, the step's micro-batches ``[(x, y, factor)]`` (the
user's loop back-propagates ``factor * loss_fn(*loss_input(call(model, x), y))`` for each) and how to take
sample i out of an input (``take``). The reference does not use the project's definitions of l_i: the
gradient of sample i is B times the gradient of the step's loss with every other sample's model output
detached (``out_i`` from a forward of sample i alone, float64), so g = (1/B) sum_i g_i is ``.grad`` for
any reduction, ignore_index, label smoothing, class weights or micro-batch factor.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch import nn
from torch.nn import functional as F

V, T, D, H = 11, 5, 8, 2


def _tensors(x, f):
    if isinstance(x, dict):
        return {k: _tensors(v, f) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_tensors(v, f) for v in x)
    return f(x) if isinstance(x, torch.Tensor) else x


def narrow(x, i):
    return _tensors(x, lambda t: t[i:i + 1])


def to_double(x):
    return _tensors(x, lambda t: t.double() if t.is_floating_point() else t)


@dataclass
class Unseen:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    micro: List[Tuple[Any, torch.Tensor, float]]
    loss_input: Callable = lambda o, y: (o, y)
    call: Callable = lambda m, x: m(x)
    take: Callable = narrow  # (x, i) -> the input of sample i alone
    size: Callable = lambda x: int(x.shape[0])
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def B(self) -> int:
        return sum(self.size(x) for x, _, _ in self.micro)

    def step_loss(self, model=None):
        m = model or self.model
        return sum(c * self.loss_fn(*self.loss_input(self.call(m, x), y)) for x, y, c in self.micro)


def _splice(full, part, i):
    """The batch output ``full`` (detached) with sample i's rows taken from ``part`` (a batch of one)."""
    if isinstance(full, dict):
        return {k: _splice(full[k], part[k], i) for k in full}
    if isinstance(full, (tuple, list)):
        return type(full)(_splice(a, b, i) for a, b in zip(full, part))
    if not isinstance(full, torch.Tensor) or not full.is_floating_point():
        return full
    return torch.cat([full[:i].detach(), part, full[i + 1:].detach()])


def reference(u: Unseen, model: nn.Module, weights: str = "samples"):
    """(loss, [g_i per parameter [B, *shape]], names) in float64.

    ``weights="samples"`` (cockpit-lite's definition, ``PerSampleView.mean_grad``): every sample weighs the
    same, g_i = b_k grad(L_k | the others' outputs detached), l_i of micro-batch k likewise, the loss is
    (1/B) sum_i l_i = sum_k (b_k / B) L_k whatever factor the loop put on each micro-batch's loss; equal to
    ``.grad`` when the factors are proportional to b_k. ``weights="backward"``: the factors the loop
    back-propagated, g_i = B c_k grad(L_k | ...), the mean of the g_i is ``.grad``."""
    m = copy.deepcopy(model).double()
    fn = copy.deepcopy(u.loss_fn).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    B = u.B
    grads = [torch.zeros(B, *p.shape, dtype=torch.float64) for p in params]
    total, k = 0.0, 0
    for x, y, c in u.micro:
        x = to_double(x)
        with torch.no_grad():
            full = u.call(m, x)
            w = c if weights == "backward" else u.size(x) / B
            total += w * float(fn(*u.loss_input(full, y)))
        for i in range(u.size(x)):
            part = u.call(m, u.take(x, i))
            li = B * w * fn(*u.loss_input(_splice(full, part, i), y))
            for p in params:
                p.grad = None
            li.backward()  # not autograd.grad: reentrant checkpointing refuses it
            for j, p in enumerate(params):
                if p.grad is not None:
                    grads[j][k] = p.grad
            k += 1
    return total, grads, names


# -- models --------------------------------------------------------------------------------------------------------
class ViT(nn.Module):
    def __init__(self, d=D, patch=2, img=4, C=3, classes=3):
        super().__init__()
        self.patch = nn.Conv2d(C, d, patch, patch)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, (img // patch) ** 2 + 1, d))
        self.enc = nn.TransformerEncoderLayer(d, H, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.enc(t)[:, 0])


class RelBiasAttn(nn.Module):
    """T5-style learned relative position bias: an (2T-1, H) table indexed by (T, T) relative positions,
    added to the attention scores and broadcast over the batch. ``table``: 'embedding' (T5) or 'param'."""

    def __init__(self, table="embedding"):
        super().__init__()
        self.kind = table
        self.emb = nn.Embedding(V, D)
        self.qkv = nn.Linear(D, 3 * D)
        if table == "embedding":
            self.rel = nn.Embedding(2 * T - 1, H)
        else:
            self.rel = nn.Parameter(0.1 * torch.randn(2 * T - 1, H))
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        B, L = idx.shape
        x = self.emb(idx)
        q, k, v = (t.view(B, L, H, D // H).transpose(1, 2) for t in self.qkv(x).split(D, dim=2))
        pos = torch.arange(L)
        rel = pos[None, :] - pos[:, None] + T - 1
        bias = (self.rel(rel) if self.kind == "embedding" else self.rel[rel]).permute(2, 0, 1)  # [H, L, L]
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H) + bias, dim=-1)
        return self.head((att @ v).transpose(1, 2).reshape(B, L, D) + x)


class PaddedEncoder(nn.Module):
    """nn.TransformerEncoder(batch_first) with src_key_padding_mask and mean pooling over unpadded tokens."""

    def __init__(self, pad=0, classes=3):
        super().__init__()
        self.pad = pad
        self.emb = nn.Embedding(V, D, padding_idx=pad)
        layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=2 * D, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, classes)

    def forward(self, idx):
        mask = idx == self.pad
        h = self.enc(self.emb(idx), src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class NormGPT(nn.Module):
    """GPT block with RMSNorm or LayerNorm(elementwise_affine), GELU MLP, dropout 0, Embedding(padding_idx)."""

    def __init__(self, norm="rms", pad=0):
        super().__init__()
        mk = (lambda: nn.RMSNorm(D)) if norm == "rms" else (lambda: nn.LayerNorm(D, elementwise_affine=True))
        self.wte = nn.Embedding(V, D, padding_idx=pad)
        self.wpe = nn.Embedding(T, D)
        self.n1, self.n2, self.nf = mk(), mk(), mk()
        self.attn = nn.MultiheadAttention(D, H, dropout=0.0, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        L = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(L))
        h = self.n1(x)
        mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        x = x + self.mlp(self.n2(x))
        return self.head(self.nf(x))


class BagModel(nn.Module):
    """EmbeddingBag over flat tokens with offsets (the usual text-classification way) or a 2-D input."""

    def __init__(self, mode="mean", classes=3):
        super().__init__()
        self.bag = nn.EmbeddingBag(V, D, mode=mode)
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        if isinstance(x, dict):
            return self.head(self.bag(x["tokens"], x["offsets"]))
        return self.head(self.bag(x))


class TextCNN(nn.Module):
    """Conv1d over [B, C, T] embeddings, max over time."""

    def __init__(self, classes=3):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.conv = nn.Conv1d(D, 6, 3, padding=1)
        self.head = nn.Linear(6, classes)

    def forward(self, idx):
        h = F.relu(self.conv(self.emb(idx).transpose(1, 2)))
        return self.head(h.max(dim=2).values)


class DictLM(nn.Module):
    """Returns a dict; forward takes keyword arguments only (input_ids, attention_mask)."""

    def __init__(self, as_tuple=False):
        super().__init__()
        self.as_tuple = as_tuple
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.lm = nn.Linear(D, V)

    def forward(self, *, input_ids, attention_mask=None):
        h = torch.tanh(self.mix(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.lm(h)
        return (logits, h) if self.as_tuple else {"logits": logits, "hidden": h}


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.lm = nn.Linear(D, V)

    def forward(self, idx):
        return self.lm(torch.tanh(self.mix(self.emb(idx))))


# -- data ----------------------------------------------------------------------------------------------------------
def tokens(B, seed=0, pad_y=True, pad_x=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    for i in range(B):
        n = (i * 2 + 1) % T if pad_y or pad_x is not None else 0
        if n and pad_y:
            y[i, T - n:] = -100
        if n and pad_x is not None:
            x[i, T - n:] = pad_x
    return x, y


def labels(B, classes=3, seed=1):
    return torch.randint(0, classes, (B,), generator=torch.Generator().manual_seed(seed))


def flat(o, y):
    return o.reshape(-1, o.shape[-1]), y.reshape(-1)


def cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out: Dict[str, Callable[[], Unseen]] = {}

    def case(name):
        def deco(f):
            def build():
                torch.manual_seed(0)
                return f()
            out[name] = build
            return f
        return deco

    ce = nn.CrossEntropyLoss

    @case("vit")
    def _():
        x = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(2))
        return Unseen("vit", ViT(), ce(), [(x, labels(B), 1.0)])

    for table in ("embedding", "param"):
        @case(f"rel_bias_{table}")
        def _(table=table):
            x, y = tokens(B)
            return Unseen(f"rel_bias_{table}", RelBiasAttn(table), ce(ignore_index=-100), [(x, y, 1.0)], flat)

    @case("padded_encoder")
    def _():
        x, _ = tokens(B, pad_y=False, pad_x=0)
        return Unseen("padded_encoder", PaddedEncoder(), ce(), [(x, labels(B), 1.0)])

    @case("label_smoothing")
    def _():
        x, y = tokens(B)
        return Unseen("label_smoothing", TinyLM(), ce(label_smoothing=0.1, ignore_index=-100), [(x, y, 1.0)], flat)

    @case("class_weights")
    def _():
        x, y = tokens(B)
        w = torch.linspace(0.5, 2.0, V)
        return Unseen("class_weights", TinyLM(), ce(weight=w, ignore_index=-100), [(x, y, 1.0)], flat)

    @case("class_weights_smoothing")
    def _():
        x, y = tokens(B)
        w = torch.linspace(0.5, 2.0, V)
        return Unseen("class_weights_smoothing", TinyLM(), ce(weight=w, label_smoothing=0.1, ignore_index=-100),
                      [(x, y, 1.0)], flat)

    for pad in (False, True):
        @case(f"accumulate_1_3{'_pad' if pad else ''}")
        def _(pad=pad):
            x, y = tokens(B, pad_y=pad)
            micro = [(x[:1], y[:1], 0.5), (x[1:], y[1:], 0.5)]
            return Unseen(f"accumulate_1_3{'_pad' if pad else ''}", TinyLM(), ce(ignore_index=-100), micro, flat)

    @case("accumulate_1_3_classifier")
    def _():
        x, _ = tokens(B, pad_y=False)
        y = labels(B)
        micro = [(x[:1], y[:1], 0.5), (x[1:], y[1:], 0.5)]
        return Unseen("accumulate_1_3_classifier", TextCNN(), ce(), micro)

    for norm in ("rms", "layer"):
        @case(f"gpt_{norm}norm")
        def _(norm=norm):
            x, y = tokens(B, pad_x=0)
            return Unseen(f"gpt_{norm}norm", NormGPT(norm), ce(ignore_index=-100), [(x, y, 1.0)], flat)

    @case("embedding_bag_2d")
    def _():
        x, _ = tokens(B, pad_y=False)
        return Unseen("embedding_bag_2d", BagModel(), ce(), [(x, labels(B), 1.0)])

    @case("embedding_bag_offsets")
    def _():
        lens = [2, 4, 1, 3][:B]
        g = torch.Generator().manual_seed(3)
        toks = torch.randint(0, V, (sum(lens),), generator=g)
        offs = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)[:-1]))

        def take(x, i):
            a = int(x["offsets"][i])
            b = int(x["offsets"][i + 1]) if i + 1 < len(x["offsets"]) else len(x["tokens"])
            return {"tokens": x["tokens"][a:b], "offsets": torch.tensor([0])}

        return Unseen("embedding_bag_offsets", BagModel("sum"), ce(), [({"tokens": toks, "offsets": offs}, labels(B), 1.0)],
                      take=take, size=lambda x: len(x["offsets"]))

    @case("text_cnn")
    def _():
        x, _ = tokens(B, pad_y=False)
        return Unseen("text_cnn", TextCNN(), ce(), [(x, labels(B), 1.0)])

    for as_tuple in (False, True):
        @case(f"kwargs_{'tuple' if as_tuple else 'dict'}")
        def _(as_tuple=as_tuple):
            x, y = tokens(B, pad_x=0)
            inp = {"input_ids": x, "attention_mask": (x != 0).long()}
            li = (lambda o, y: flat(o[0], y)) if as_tuple else (lambda o, y: flat(o["logits"], y))
            return Unseen(f"kwargs_{'tuple' if as_tuple else 'dict'}", DictLM(as_tuple), ce(ignore_index=-100),
                          [(inp, y, 1.0)], li, call=lambda m, x: m(**x), size=lambda x: int(x["input_ids"].shape[0]))
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
    out: Dict[str, Callable[[], Unseen]] = {}
    g = torch.Generator().manual_seed(5)

    def add(name, f):
        def build():
            torch.manual_seed(0)
            return f()
        out[name] = build

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
    out: Dict[str, Callable[[], Unseen]] = {}
    g = torch.Generator().manual_seed(7)
    xm = torch.randn(B, 5, generator=g)

    def add(name, f):
        def build():
            torch.manual_seed(0)
            return f()
        out[name] = build

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
