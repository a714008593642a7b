"""Round-4 probe (brief probe_models, real-model class): models written the way current code bases write them, at
tiny sizes, in the harness of tests/unseen_models.py (``Unseen`` + the float64 ``reference`` that needs no
definition of l_i). A Llama block (hand-written RMSNorm, rotary embeddings from cos/sin buffers, grouped-query
attention through ``F.scaled_dot_product_attention``, SwiGLU, tied unembedding), a mixture-of-experts LM (top-1 /
top-2 routing with index_select / index_add_), a small UNet (GroupNorm, ConvTranspose2d, Upsample, skip
concatenations, per-pixel MSE), a ViT (cls token expanded over the batch, learned positions, pre-norm
``nn.TransformerEncoder``), parameters used directly (einsum / bmm with a bare ``nn.Parameter``, LayerNorm without
affine and its own scale, Bilinear, PReLU, weight_norm) and an LSTM over packed sequences (batch_first)."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F

from unseen_models import Unseen, flat, labels

V, T, D = 13, 6, 8


# -- 1. Llama ------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Written by hand as Llama's reference code does (weight only, computed in float32)."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d) + 0.1 * torch.randn(d))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.type_as(x)


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class LlamaAttention(nn.Module):
    def __init__(self, d=D, heads=4, kv_heads=2, gqa="enable_gqa"):
        super().__init__()
        self.h, self.kv, self.hd, self.gqa = heads, kv_heads, d // heads, gqa
        self.q_proj = nn.Linear(d, heads * self.hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x, cos, sin):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv, self.hd).transpose(1, 2)
        cos, sin = cos[:L], sin[:L]  # [L, hd], broadcast over batch and heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.gqa == "enable_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # the older way: repeat the key/value heads
            rep = self.h // self.kv
            o = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                               is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class SwiGLU(nn.Module):
    def __init__(self, d=D, hidden=12):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Llama(nn.Module):
    def __init__(self, layers=1, gqa="enable_gqa", tied=True, heads=4, kv_heads=2):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.input_layernorm = RMSNorm(D)
            blk.self_attn = LlamaAttention(D, heads, kv_heads, gqa)
            blk.post_attention_layernorm = RMSNorm(D)
            blk.mlp = SwiGLU(D)
            self.layers.append(blk)
        self.norm = RMSNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        hd = D // heads
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.outer(torch.arange(T).float(), inv)
        emb = torch.cat([ang, ang], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, idx):
        x = self.tok(idx)
        for blk in self.layers:
            x = x + blk.self_attn(blk.input_layernorm(x), self.cos.to(x.dtype), self.sin.to(x.dtype))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        return self.head(self.norm(x))


# -- 2. mixture of experts -----------------------------------------------------------------------------------------
class MoE(nn.Module):
    """Switch / Mixtral-style sparse layer: a router, top-k softmax gates, each expert's tokens gathered with
    index_select and its weighted output scattered back with index_add_ (no capacity limit: tokens do not mix)."""

    def __init__(self, d=D, experts=4, k=1, hidden=10, renorm=True):
        super().__init__()
        self.k, self.renorm = k, renorm
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))
                                     for _ in range(experts))

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        probs = self.router(h).softmax(-1)
        gate, which = probs.topk(self.k, dim=-1)  # [N, k]
        if self.renorm and self.k > 1:
            gate = gate / gate.sum(-1, keepdim=True)
        out = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(which == e)
            if tok.numel() == 0:
                continue
            y = expert(h.index_select(0, tok)) * gate[tok, slot].unsqueeze(-1)
            out.index_add_(0, tok, y)
        return out.reshape(shape)


class MoELM(nn.Module):
    def __init__(self, k=1):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.ln = nn.LayerNorm(D)
        self.moe = MoE(D, k=k)
        self.lnf = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + self.moe(self.ln(x))
        return self.head(self.lnf(x))


# -- 3. UNet -------------------------------------------------------------------------------------------------------
def block(cin, cout, groups=2):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(groups, cout), nn.SiLU())


class UNet(nn.Module):
    def __init__(self, c=2, w=4):
        super().__init__()
        self.d1 = block(c, w)
        self.down = nn.Conv2d(w, 2 * w, 2, stride=2)
        self.d2 = block(2 * w, 2 * w)
        self.pool = nn.MaxPool2d(2)
        self.mid = block(2 * w, 2 * w)
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.u1 = block(4 * w, 2 * w)
        self.up2 = nn.ConvTranspose2d(2 * w, w, 2, stride=2)
        self.u2 = block(2 * w, w)
        self.out = nn.Conv2d(w, c, 1)

    def forward(self, x):  # [B, c, 8, 8]
        s1 = self.d1(x)                       # [B, w, 8, 8]
        s2 = self.d2(self.down(s1))           # [B, 2w, 4, 4]
        m = self.mid(self.pool(s2))           # [B, 2w, 2, 2]
        h = self.u1(torch.cat([self.up1(m), s2], 1))
        h = self.u2(torch.cat([self.up2(h), s1], 1))
        return self.out(h)


# -- 4. ViT --------------------------------------------------------------------------------------------------------
class ViT(nn.Module):
    def __init__(self, d=D, patch=2, img=4, C=3, classes=3, layers=2):
        super().__init__()
        self.patch = nn.Conv2d(C, d, patch, stride=patch)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.pos = nn.Parameter(0.1 * torch.randn(1, (img // patch) ** 2 + 1, d))
        layer = nn.TransformerEncoderLayer(d, 2, dim_feedforward=2 * d, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        B = x.shape[0]
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(B, -1, -1), t], dim=1)
        t = t + self.pos
        return self.head(self.norm(self.enc(t))[:, 0])


# -- 5. parameters used directly -----------------------------------------------------------------------------------
class EinsumParam(nn.Module):
    """A bare weight in einsum over a sequence, LayerNorm without affine and a separate scale Parameter."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.w = nn.Parameter(0.3 * torch.randn(D, D))
        self.ln = nn.LayerNorm(D, elementwise_affine=False)
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(D))
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h = torch.einsum("btd,de->bte", self.emb(idx), self.w)
        h = self.ln(torch.tanh(h)) * self.scale
        return self.head(h)


class BmmParam(nn.Module):
    """A per-head weight [H, D, E] applied with bmm / matmul broadcast over the batch, a bias Parameter added."""

    def __init__(self, heads=2):
        super().__init__()
        self.h = heads
        self.w = nn.Parameter(0.3 * torch.randn(heads, D, D // heads))
        self.b = nn.Parameter(0.1 * torch.randn(D))
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [B, L, D]
        B, L, _ = x.shape
        h = torch.matmul(x.unsqueeze(1), self.w)  # [B, H, L, D/H]
        h = torch.tanh(h.transpose(1, 2).reshape(B, L, D) + self.b)
        return self.head(h.mean(1))


class BilinearPReLU(nn.Module):
    def __init__(self, channelwise=True):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.bil = nn.Bilinear(4, 3, 6)
        self.act = nn.PReLU(6 if channelwise else 1, init=0.2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # [B, 8]: 5 + 3 features
        u, v = x[:, :5], x[:, 5:]
        return self.head(self.act(self.bil(torch.tanh(self.a(u)), v)))


class WeightNormMLP(nn.Module):
    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        self.a = weight_norm(nn.Linear(5, 6))
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class EinsumMix(nn.Module):
    """A bare weight in einsum on a [B, D] input (no sequence), its bias a separate Parameter."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(0.3 * torch.randn(5, 6))
        self.b = nn.Parameter(0.1 * torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(torch.einsum("bi,ij->bj", x, self.w) + self.b))


# -- 6. packed LSTM ------------------------------------------------------------------------------------------------
class PackedLSTM(nn.Module):
    """pack_padded_sequence -> LSTM(batch_first) -> pad_packed_sequence, mean over each sequence's valid steps
    (``pool='mean'``) or the last hidden state h_n (``pool='h_n'``)."""

    def __init__(self, pool="mean", bidirectional=False, classes=3):
        super().__init__()
        self.pool = pool
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.rnn = nn.LSTM(D, D, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(D * (2 if bidirectional else 1), classes)

    def forward(self, x):
        idx, lengths = x["idx"], x["lengths"]
        packed = nn.utils.rnn.pack_padded_sequence(self.emb(idx), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, (h, _) = self.rnn(packed)
        if self.pool == "h_n":
            return self.head(torch.cat(list(h[-(2 if self.rnn.bidirectional else 1):]), -1))
        pad, lens = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        mask = (torch.arange(pad.shape[1])[None, :] < lens[:, None]).unsqueeze(-1).to(pad.dtype)
        return self.head((pad * mask).sum(1) / lens[:, None].to(pad.dtype))


# -- data ----------------------------------------------------------------------------------------------------------
def tokens(B, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    if pad:
        for i in range(B):
            n = (2 * i + 1) % T
            if n:
                y[i, T - n:] = -100
    return x, y


def lm_loss(o, y):
    return o.reshape(-1, o.shape[-1]), y.reshape(-1)  # logits flattened to (B*T, V) (reshape: a view here)


def cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out: Dict[str, Callable[[], Unseen]] = {}
    ce = nn.CrossEntropyLoss

    def add(name, f):
        def build():
            torch.manual_seed(0)
            return f()
        out[name] = build

    for gqa in ("enable_gqa", "repeat"):
        for tied in (True, False):
            name = f"llama_{gqa}{'_tied' if tied else ''}"
            add(name, lambda gqa=gqa, tied=tied, name=name: Unseen(
                name, Llama(1, gqa, tied), ce(ignore_index=-100), [(*tokens(B), 1.0)], lm_loss))
    add("llama_2_layers_view", lambda: Unseen("llama_2_layers_view", Llama(2), ce(ignore_index=-100),
                                              [(*tokens(B), 1.0)], lambda o, y: (o.view(-1, V), y.view(-1))))
    for k in (1, 2):
        add(f"moe_top{k}", lambda k=k: Unseen(f"moe_top{k}", MoELM(k), ce(ignore_index=-100), [(*tokens(B), 1.0)], flat))

    def unet():
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(B, 2, 8, 8, generator=g), torch.randn(B, 2, 8, 8, generator=g)
        return Unseen("unet", UNet(), nn.MSELoss(), [(x, y, 1.0)])
    add("unet", unet)

    def vit():
        x = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(5))
        return Unseen("vit_prenorm", ViT(), ce(), [(x, labels(B), 1.0)])
    add("vit_prenorm", vit)

    add("einsum_param_seq", lambda: Unseen("einsum_param_seq", EinsumParam(), ce(ignore_index=-100),
                                           [(*tokens(B), 1.0)], flat))
    g = torch.Generator().manual_seed(6)
    xs, x5, x8 = torch.randn(B, T, D, generator=g), torch.randn(B, 5, generator=g), torch.randn(B, 8, generator=g)
    add("bmm_param", lambda: Unseen("bmm_param", BmmParam(), ce(), [(xs, labels(B), 1.0)]))
    add("einsum_param_flat", lambda: Unseen("einsum_param_flat", EinsumMix(), ce(), [(x5, labels(B), 1.0)]))
    for cw in (True, False):
        add(f"bilinear_prelu{'' if cw else '_shared'}", lambda cw=cw: Unseen(
            f"bilinear_prelu{'' if cw else '_shared'}", BilinearPReLU(cw), ce(), [(x8, labels(B), 1.0)]))
    add("weight_norm", lambda: Unseen("weight_norm", WeightNormMLP(), ce(), [(x5, labels(B), 1.0)]))

    lengths = torch.tensor([T, 3, 1, 5, 2, 4, 6, 2][:B])
    gi = torch.Generator().manual_seed(8)
    idx = torch.randint(1, V, (B, T), generator=gi)
    for i, n in enumerate(lengths.tolist()):
        idx[i, n:] = 0

    def take(x, i):
        n = int(x["lengths"][i])
        return {"idx": x["idx"][i:i + 1, :n], "lengths": x["lengths"][i:i + 1]}

    for pool in ("mean", "h_n"):
        for bi in (False, True):
            name = f"packed_lstm_{pool}{'_bi' if bi else ''}"
            add(name, lambda pool=pool, bi=bi, name=name: Unseen(
                name, PackedLSTM(pool, bi), ce(), [({"idx": idx, "lengths": lengths}, labels(B), 1.0)],
                take=take, size=lambda x: int(x["idx"].shape[0])))
    return out
