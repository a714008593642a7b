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

from unseen_models import Unseen, flat, labels, seeded_cases

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
    def __init__(self, layers=1, gqa="enable_gqa", tied=True, heads=4, kv_heads=2, d=D, vocab=V, hidden=12):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.input_layernorm = RMSNorm(d)
            blk.self_attn = LlamaAttention(d, heads, kv_heads, gqa)
            blk.post_attention_layernorm = RMSNorm(d)
            blk.mlp = SwiGLU(d, hidden)
            self.layers.append(blk)
        self.norm = RMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        hd = d // heads
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
    def __init__(self, k=1, d=D, vocab=V, experts=4, hidden=10):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(T, d)
        self.ln = nn.LayerNorm(d)
        self.moe = MoE(d, experts, k, hidden)
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

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
    out, add = seeded_cases()
    ce = nn.CrossEntropyLoss

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


# -- beyond the brief's list: the same families written in other common ways -----------------------------------------
class StdConv2d(nn.Conv2d):
    """timm's StdConv2d (BiT / ResNetV2): the weight standardized in forward before F.conv2d."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / torch.sqrt(w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
                                                                      + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class EqualLinear(nn.Linear):
    """StyleGAN's equalized-learning-rate Linear: weight and bias scaled in forward."""

    def __init__(self, i, o, lr_mul=0.5):
        super().__init__(i, o)
        self.scale, self.lr_mul = lr_mul / i ** 0.5, lr_mul

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = StdConv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.f = EqualLinear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.gn(self.c(x))).mean((2, 3))
        return self.head(torch.tanh(self.f(h)))


class LoRALinear(nn.Module):
    """A frozen base Linear and a low-rank update: bare Parameters (``bare=True``, hand-written) or two
    nn.Linear (PEFT's layout); the update merged into the weight in forward (``merged=True``)."""

    def __init__(self, i, o, r=2, bare=True, merged=False):
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.bare, self.merged, self.s = bare, merged, 2.0 / r
        if bare:
            self.lora_A = nn.Parameter(0.3 * torch.randn(r, i))
            self.lora_B = nn.Parameter(0.3 * torch.randn(o, r))
        else:
            self.lora_A, self.lora_B = nn.Linear(i, r, bias=False), nn.Linear(r, o, bias=False)
            nn.init.normal_(self.lora_B.weight, std=0.3)

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.base.weight + self.s * self.lora_B @ self.lora_A, self.base.bias)
        if self.bare:
            return self.base(x) + self.s * (x @ self.lora_A.T) @ self.lora_B.T
        return self.base(x) + self.s * self.lora_B(self.lora_A(x))


class LoRALM(nn.Module):
    def __init__(self, bare=True, merged=False):
        super().__init__()
        self.tok = nn.Embedding(V, D)
        self.tok.requires_grad_(False)
        self.q = LoRALinear(D, D, bare=bare, merged=merged)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        return self.head(torch.tanh(self.q(self.tok(idx))))


class TimeUNet(nn.Module):
    """A diffusion UNet's time conditioning: a per-sample timestep, sinusoidal features, an MLP, added to the
    feature maps broadcast over H and W; the input is a dict {x, t}."""

    def __init__(self, c=2, w=4):
        super().__init__()
        self.inc = nn.Conv2d(c, w, 3, padding=1)
        self.temb = nn.Sequential(nn.Linear(8, w), nn.SiLU(), nn.Linear(w, w))
        self.gn = nn.GroupNorm(2, w)
        self.down = nn.Conv2d(w, w, 2, stride=2)
        self.up = nn.ConvTranspose2d(w, w, 2, stride=2)
        self.out = nn.Conv2d(2 * w, c, 3, padding=1)

    def forward(self, x, t):
        freqs = torch.exp(-torch.arange(4, dtype=x.dtype) * 0.5)
        ang = t.to(x.dtype)[:, None] * freqs[None]
        te = self.temb(torch.cat([ang.sin(), ang.cos()], -1))
        h = F.silu(self.gn(self.inc(x) + te[:, :, None, None]))
        u = self.up(F.silu(self.down(h)))
        return self.out(torch.cat([u, h], 1))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm and Linear on channels-last [B, H, W, C], layer scale gamma."""

    def __init__(self, c=4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 2, stride=2)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.ln = nn.LayerNorm(c, eps=1e-6)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(0.5 * torch.ones(c))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.pw2(F.gelu(self.pw1(self.ln(h)))) * self.gamma
        x = x + h.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class Mixer(nn.Module):
    """MLP-Mixer: token mixing by a Linear over the sequence axis of [B, D, T]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.tok_mlp = nn.Sequential(nn.Linear(T, 2 * T), nn.GELU(), nn.Linear(2 * T, T))
        self.ch_mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.tok_mlp(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ch_mlp(self.ln2(x))
        return self.head(x.mean(1))


class QueryDecoder(nn.Module):
    """DETR / Perceiver: learned queries (an nn.Embedding's weight read directly, or a Parameter expanded over the
    batch) cross-attending to the inputs through nn.MultiheadAttention."""

    def __init__(self, kind="embedding_weight", queries=3):
        super().__init__()
        self.kind = kind
        self.inp = nn.Linear(5, D)
        if kind == "embedding_weight":
            self.query_embed = nn.Embedding(queries, D)
        else:
            self.latents = nn.Parameter(0.5 * torch.randn(queries, D))
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # [B, L, 5]
        B = x.shape[0]
        mem = self.inp(x)
        if self.kind == "embedding_weight":
            q = self.query_embed.weight.unsqueeze(0).repeat(B, 1, 1)
        else:
            q = self.latents.expand(B, -1, -1)
        o, _ = self.attn(q, mem, mem, need_weights=False)
        return self.head(o.mean(1))


class TableIndex(nn.Module):
    """A bare table indexed by the tokens (``table[idx]``) or read through F.embedding."""

    def __init__(self, how="index"):
        super().__init__()
        self.how = how
        self.table = nn.Parameter(torch.randn(V, D))
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        e = self.table[idx] if self.how == "index" else F.embedding(idx, self.table)
        return self.head(torch.tanh(e).mean(1))


class MaskedLlama(Llama):
    """Llama with a padding mask (left padding) combined with the causal mask, positions from the mask's cumsum,
    called with keyword arguments as Hugging Face models are (input_ids, attention_mask); Gemma's sqrt(D) scaling."""

    def forward(self, input_ids, attention_mask):
        B, L = input_ids.shape
        x = self.tok(input_ids) * D ** 0.5
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L], per sample
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, L, hd]
        keep = attention_mask.bool()[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
        for blk in self.layers:
            a = blk.self_attn
            h = blk.input_layernorm(x)
            q = a.q_proj(h).view(B, L, a.h, a.hd).transpose(1, 2)
            k = a.k_proj(h).view(B, L, a.kv, a.hd).transpose(1, 2)
            v = a.v_proj(h).view(B, L, a.kv, a.hd).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
            x = x + a.o_proj(o.transpose(1, 2).reshape(B, L, -1))
            x = x + blk.mlp(blk.post_attention_layernorm(x))
        return self.head(self.norm(x))


class AuxMoELM(MoELM):
    """Switch-style load-balancing loss returned next to the logits (added to the loss in the loop)."""

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        h = self.ln(x).reshape(-1, x.shape[-1])
        probs = self.moe.router(h).softmax(-1)
        frac = F.one_hot(probs.argmax(-1), probs.shape[-1]).float().mean(0)
        aux = probs.shape[-1] * (frac * probs.mean(0)).sum()
        x = x + self.moe(self.ln(x))
        return self.head(self.lnf(x)), aux


def more_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    ce = nn.CrossEntropyLoss

    g = torch.Generator().manual_seed(9)
    img, xs = torch.randn(B, 3, 6, 6, generator=g), torch.randn(B, T, 5, generator=g)
    add("std_conv_equal_linear", lambda: Unseen("std_conv_equal_linear", StdNet(), ce(), [(img, labels(B), 1.0)]))
    for bare in (True, False):
        for merged in ((False, True) if bare else (False,)):
            name = f"lora_{'bare' if bare else 'linear'}{'_merged' if merged else ''}"
            add(name, lambda bare=bare, merged=merged, name=name: Unseen(
                name, LoRALM(bare, merged), ce(ignore_index=-100), [(*tokens(B), 1.0)], flat))

    def time_unet():
        gg = torch.Generator().manual_seed(10)
        x, y = torch.randn(B, 2, 4, 4, generator=gg), torch.randn(B, 2, 4, 4, generator=gg)
        t = torch.randint(0, 1000, (B,), generator=gg)
        return Unseen("time_unet", TimeUNet(), nn.MSELoss(), [({"x": x, "t": t}, y, 1.0)], call=lambda m, x: m(**x),
                      size=lambda x: int(x["x"].shape[0]))
    add("time_unet", time_unet)
    add("convnext", lambda: Unseen("convnext", ConvNeXtBlock(), ce(), [(img, labels(B), 1.0)]))
    add("mixer", lambda: Unseen("mixer", Mixer(), ce(), [(tokens(B)[0], labels(B), 1.0)]))
    for kind in ("embedding_weight", "latents"):
        add(f"queries_{kind}", lambda kind=kind: Unseen(f"queries_{kind}", QueryDecoder(kind), ce(),
                                                        [(xs, labels(B), 1.0)]))
    for how in ("index", "f_embedding"):
        add(f"table_{how}", lambda how=how: Unseen(f"table_{how}", TableIndex(how), ce(), [(tokens(B)[0], labels(B), 1.0)]))

    def masked_llama():
        x, y = tokens(B)
        mask = torch.ones(B, T, dtype=torch.long)
        for i in range(B):
            mask[i, :i] = 0  # left padding
            x[i, :i] = 0
            y[i, :i] = -100
        return Unseen("masked_llama", MaskedLlama(1), ce(ignore_index=-100), [({"input_ids": x, "attention_mask": mask},
                      y, 1.0)], lm_loss, call=lambda m, x: m(**x), size=lambda x: int(x["input_ids"].shape[0]))
    add("masked_llama", masked_llama)

    def sorted_batch():
        x = torch.randn(B, 5, generator=torch.Generator().manual_seed(11))
        x[:, 0] = torch.tensor([3.0, -1.0, 2.0, 0.5, 1.0, -2.0, 0.0, -0.5][:B])  # sample 0 first, the rest reordered
        return Unseen("sorted_batch", SortedBatch(), ce(), [(x, labels(B), 1.0)])
    add("sorted_batch", sorted_batch)
    for k in (1, 2):
        add(f"mixtral_top{k}", lambda k=k: Unseen(f"mixtral_top{k}", MixtralLM(k), ce(ignore_index=-100),
                                                  [(*tokens(B, pad=False), 1.0)], flat))
    return out


class SortedBatch(nn.Module):
    """Older RNN code: the batch sorted by length inside forward (``x[perm]``), a layer on the sorted rows, the
    order restored (``h[inverse]``) before the head."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x):  # [B, 5]; column 0 plays the length
        perm = x[:, 0].argsort(descending=True)
        h = torch.tanh(self.a(x[perm]))
        return self.b(h[perm.argsort()])


def curvature_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    """The brief's families at sizes whose dense float64 Hessian takes seconds (100-300 parameters; the UNet 1,339):
    {name: builder}; the loss input and target as in ``cases``, tokens below 7 for the 7-token vocabularies."""
    out, add = seeded_cases()
    ce = nn.CrossEntropyLoss

    def small_tokens():
        x, y = tokens(B)
        return x % 7, torch.where(y < 0, y, y % 7)

    add("llama_tied", lambda: Unseen("llama_tied", Llama(1, "enable_gqa", True, heads=2, kv_heads=1, d=4, vocab=7,
                                                         hidden=6), ce(ignore_index=-100), [(*small_tokens(), 1.0)], lm_loss))
    for k in (1, 2):
        add(f"moe_top{k}", lambda k=k: Unseen(f"moe_top{k}", MoELM(k, d=4, vocab=7, experts=3, hidden=4),
                                              ce(ignore_index=-100), [(*small_tokens(), 1.0)], lm_loss))

    def unet():
        g = torch.Generator().manual_seed(4)
        x, y = torch.randn(B, 1, 4, 4, generator=g), torch.randn(B, 1, 4, 4, generator=g)
        return Unseen("unet", UNet(c=1, w=2), nn.MSELoss(), [(x, y, 1.0)])
    add("unet", unet)

    def vit():
        x = torch.randn(B, 3, 4, 4, generator=torch.Generator().manual_seed(5))
        return Unseen("vit_prenorm", ViT(d=4, layers=1), ce(), [(x, labels(B), 1.0)])
    add("vit_prenorm", vit)
    g = torch.Generator().manual_seed(6)
    xs, x8 = torch.randn(B, T, D, generator=g), torch.randn(B, 8, generator=g)
    add("bmm_param", lambda: Unseen("bmm_param", BmmParam(), ce(), [(xs, labels(B), 1.0)]))
    add("bilinear_prelu", lambda: Unseen("bilinear_prelu", BilinearPReLU(), ce(), [(x8, labels(B), 1.0)]))
    return out


class MixtralMoE(nn.Module):
    """Hugging Face's Mixtral / Qwen-MoE sparse block: top-k of the router's softmax renormalised, a one-hot expert
    mask, each expert's tokens taken as ``hidden[None, top_x].reshape(-1, d)``, SwiGLU experts, the weighted outputs
    added back with ``index_add_``."""

    def __init__(self, d=D, experts=4, k=2, hidden=6):
        super().__init__()
        self.k, self.n = k, experts
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d, hidden) for _ in range(experts))

    def forward(self, x):
        B, L, d = x.shape
        h = x.view(-1, d)
        weights = F.softmax(self.gate(h), dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.k, dim=-1)
        if self.k > 1:  # (top-1 renormalised is 1: the router would get no gradient, only float32 rounding)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        mask = F.one_hot(selected, num_classes=self.n).permute(2, 1, 0)
        for e in range(self.n):
            idx, top_x = torch.where(mask[e])
            state = h[None, top_x].reshape(-1, d)
            y = self.experts[e](state) * weights[top_x, idx, None]
            out.index_add_(0, top_x, y.to(h.dtype))
        return out.reshape(B, L, d)


class MixtralLM(MoELM):
    def __init__(self, k=2):
        super().__init__(k)
        self.moe = MixtralMoE(D, k=k)
