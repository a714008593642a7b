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
    names = [n for n, p in m.named_parameters() if p.requires_grad]  # frozen ones: no gradient, left out
    params = [p for _, p in m.named_parameters() if p.requires_grad]
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
                    grads[j][k] = p.grad.to_dense() if p.grad.is_sparse else p.grad
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


def reference_losses(u: Unseen, model: nn.Module) -> torch.Tensor:
    """[B] l_i in float64 for one micro-batch: the sample's share of the mean loss times B (sum of its elements
    of the loss with reduction 'none' over the normaliser N = sum / mean). Elements are grouped by sample in
    sample-major blocks (what view(-1, V) of [B, T, V] gives)."""
    (x, y, _), = u.micro
    m = copy.deepcopy(model).double()
    fn = copy.deepcopy(u.loss_fn).double()
    none = copy.deepcopy(fn)
    none.reduction = "none"
    B = u.size(x)
    with torch.no_grad():
        out = u.call(m, to_double(x))
        mean = fn(*u.loss_input(out, y))
        el = none(*u.loss_input(out, y))
    per = el.reshape(B, -1).sum(1)
    return per * (B * mean / el.sum())


def seeded_cases():
    """({name: builder}, add): ``add(name, f)`` registers ``f``, built under torch's seed 0 (the probe files'
    case tables)."""
    out: Dict[str, Callable[[], Unseen]] = {}

    def add(name, f):
        def build():
            torch.manual_seed(0)
            return f()
        out[name] = build
    return out, add


def grad_norm_wrong(rec, G, names) -> list:
    """[(key, logged, reference)] where the logged grad_norm (total and per parameter) differs from the norm of the
    mean of the reference's per-sample gradients ``G`` (rel 1e-4)."""
    means = [g.mean(0) for g in G]
    vals, wrong = rec["values"], []
    total = float(torch.sqrt(sum((g ** 2).sum() for g in means)))
    if not math.isclose(float(vals["grad_norm"]), total, rel_tol=1e-4):
        wrong.append(("grad_norm", vals["grad_norm"], total))
    for n, g in zip(names, means):
        if not math.isclose(float(vals[f"grad_norm/{n}"]), float(g.norm()), rel_tol=1e-4, abs_tol=1e-7):
            wrong.append((f"grad_norm/{n}", vals[f"grad_norm/{n}"], float(g.norm())))
    return wrong


def assert_nan_as_expected(nan: Dict[str, str], expect) -> None:
    """Every NaN has a reason; ``expect`` None: no NaN at all; else a piece (or a tuple of pieces, one of which)
    every reason holds."""
    assert all(nan.values()), [k for k, r in nan.items() if not r]
    if expect is None:
        assert nan == {}, nan
    else:
        pieces = expect if isinstance(expect, tuple) else (expect,)
        assert nan and all(any(p in r for p in pieces) for r in nan.values()), nan
