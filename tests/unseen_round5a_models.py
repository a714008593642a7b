"""Round-5 probe A (brief probe5a): layer and model forms written the usual way that the earlier rounds had not
put through the float64 brute force, at tiny sizes, in the harness of tests/unseen_models.py (``Unseen`` + the
float64 ``reference`` that needs no definition of l_i): gradient checkpointing (``checkpoint`` with and without
reentrancy around a transformer block, ``checkpoint_sequential``), convolution forms (depthwise-separable,
dilated, channels_last, a multi-width text CNN, causal Conv1d, grouped ConvTranspose1d, strided Conv3d),
sequence-first ``nn.MultiheadAttention`` with a key padding mask, encoder-decoder transformers with a causal
target mask, ``nn.EmbeddingBag`` (mean / sum, offsets / 2-D, per-sample weights), ``nn.Embedding(padding_idx)``,
recurrent cells called in a Python loop over time, and bfloat16 autocast on the CPU."""

from __future__ import annotations

import copy
from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import unseen_round4_models as R4
from unseen_models import D, V, T, Unseen, flat, labels, seeded_cases, tokens


# -- 1. gradient checkpointing -------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm causal self-attention + MLP, written out (no nn.MultiheadAttention)."""

    def __init__(self, d=D, heads=2):
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = (t.view(B, L, self.h, d // self.h).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(d, -1))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(o.transpose(1, 2).reshape(B, L, d))
        return x + self.mlp(self.ln2(x))


class CheckpointGPT(nn.Module):
    """Hugging Face's gradient_checkpointing: every block's forward through ``checkpoint``."""

    def __init__(self, reentrant, layers=2):
        super().__init__()
        self.reentrant = reentrant
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(D), nn.Linear(D, V)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=self.reentrant)
        return self.head(self.lnf(x))


class CheckpointSequentialMLP(nn.Module):
    """``checkpoint_sequential`` over an nn.Sequential MLP in 2 segments. Reentrant checkpointing needs an input
    with requires_grad for the first segment's parameters to get gradients, so that variant runs a first layer
    outside (as users do)."""

    def __init__(self, reentrant):
        super().__init__()
        self.reentrant = reentrant
        self.stem = nn.Linear(5, 6) if reentrant else nn.Identity()
        self.net = nn.Sequential(nn.Linear(6 if reentrant else 5, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(),
                                 nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return checkpoint_sequential(self.net, 2, self.stem(x), use_reentrant=self.reentrant)


# -- 2. convolution forms ------------------------------------------------------------------------------------------
class DepthwiseSeparable(nn.Module):
    """MobileNet's block: a depthwise Conv2d (groups=C) then a pointwise 1x1 Conv2d, BatchNorm left out."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.pw = nn.Conv2d(c, 2 * c, 1)
        self.dw2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1, groups=2 * c, bias=False)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x):  # [B, 2, 6, 6]
        h = F.relu6(self.stem(x))
        h = F.relu6(self.pw(F.relu6(self.dw(h))))
        return self.head(F.relu6(self.dw2(h)).mean((2, 3)))


class Dilated(nn.Module):
    """DeepLab-style atrous convolutions: dilation 2 and (2, 1), padding that keeps the size, reflect padding."""

    def __init__(self, classes=3):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=2, dilation=2)
        self.b = nn.Conv2d(4, 4, 3, padding=(2, 1), dilation=(2, 1), padding_mode="reflect")
        self.head = nn.Linear(4, classes)

    def forward(self, x):  # [B, 2, 6, 6]
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).amax((2, 3)))


class SmallCNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4 * 2 * 2, classes)

    def forward(self, x):  # [B, 2, 6, 6]
        return self.head(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


class KimCNN(nn.Module):
    """Kim (2014): Conv1d of widths 2, 3, 4 over [B, C, T] embeddings, max over time, concatenated."""

    def __init__(self, classes=3):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.convs = nn.ModuleList(nn.Conv1d(D, 3, k) for k in (2, 3, 4))
        self.head = nn.Linear(9, classes)

    def forward(self, idx):
        e = self.emb(idx).transpose(1, 2)
        return self.head(torch.cat([F.relu(c(e)).max(dim=2).values for c in self.convs], 1))


class CausalConv1d(nn.Conv1d):
    """WaveNet / TCN: left padding by (k - 1) * dilation with F.pad, then an unpadded conv."""

    def forward(self, x):
        return super().forward(F.pad(x, ((self.kernel_size[0] - 1) * self.dilation[0], 0)))


class TCN(nn.Module):
    """Causal dilated Conv1d stack with residual connections, a per-time-step regression (MSE on [B, 2, T])."""

    def __init__(self, c=4):
        super().__init__()
        self.inp = CausalConv1d(2, c, 2)
        self.c1 = CausalConv1d(c, c, 2, dilation=2)
        self.c2 = CausalConv1d(c, c, 3, dilation=1)
        self.out = nn.Conv1d(c, 2, 1)

    def forward(self, x):  # [B, 2, T]
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.c1(h))
        h = h + torch.tanh(self.c2(h))
        return self.out(h)


class TransposeDecoder(nn.Module):
    """ConvTranspose1d upsampling with groups, dilation and output_padding (a 1-D decoder)."""

    def __init__(self, classes=3):
        super().__init__()
        self.t1 = nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1)
        self.t2 = nn.ConvTranspose1d(4, 4, 2, stride=1, groups=2, dilation=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x):  # [B, 2, 4]
        return self.head(torch.tanh(self.t2(torch.tanh(self.t1(x)))).mean(2))


class Tiny3d(nn.Module):
    """Strided grouped Conv3d on [B, 2, 4, 4, 4] (a video / volume stem)."""

    def __init__(self, classes=3):
        super().__init__()
        self.a = nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.b = nn.Conv3d(4, 4, 1, groups=2)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))).mean((2, 3, 4)))


# -- 3. sequence-first attention, encoder-decoder ------------------------------------------------------------------
class SeqFirstMHA(nn.Module):
    """Tokens [T, B] (torchtext's layout), ``nn.MultiheadAttention(batch_first=False)`` with key_padding_mask
    [B, T], masked mean over time, a classifier."""

    def __init__(self, pad=0, classes=3):
        super().__init__()
        self.pad = pad
        self.emb = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, 2, dropout=0.0)
        self.ln = nn.LayerNorm(D)
        self.head = nn.Linear(D, classes)

    def forward(self, idx):  # [T, B]
        mask = (idx == self.pad).t()  # [B, T]
        x = self.emb(idx)
        h = self.ln(x + self.attn(x, x, x, key_padding_mask=mask, need_weights=False)[0])
        keep = (~mask).t().unsqueeze(-1).to(h.dtype)  # [T, B, 1]
        return self.head((h * keep).sum(0) / keep.sum(0))


class Seq2Seq(nn.Module):
    """``nn.Transformer`` (1 encoder, 1 decoder layer) with a causal target mask, teacher forcing; batch_first or
    sequence-first (then the logits are transposed back to [B, T, V] before the loss, as users do)."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.bf = batch_first
        self.src, self.tgt = nn.Embedding(V, D), nn.Embedding(V, D)
        self.pos = nn.Parameter(0.1 * torch.randn(T, 1, D) if not batch_first else 0.1 * torch.randn(1, T, D))
        self.tr = nn.Transformer(D, 2, 1, 1, dim_feedforward=2 * D, dropout=0.0, batch_first=batch_first)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        src, tgt = x["src"], x["tgt"]  # [B, T] each
        if not self.bf:
            src, tgt = src.t(), tgt.t()
        L = tgt.shape[0 if not self.bf else 1]
        mask = nn.Transformer.generate_square_subsequent_mask(L)
        h = self.tr(self.src(src) + self.pos, self.tgt(tgt) + self.pos, tgt_mask=mask, tgt_is_causal=True)
        out = self.head(h)
        return out if self.bf else out.transpose(0, 1)


class DecoderWithMemory(nn.Module):
    """A Conv1d encoder producing memory, ``nn.TransformerDecoder`` (post-norm, 2 layers) with cross-attention
    and a causal mask: an image/audio captioner."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv1d(3, D, 2, stride=2)
        self.tgt = nn.Embedding(V, D)
        layer = nn.TransformerDecoderLayer(D, 2, dim_feedforward=2 * D, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        memory = self.enc(x["feat"]).transpose(1, 2)  # [B, 3, D]
        L = x["tgt"].shape[1]
        mask = torch.triu(torch.full((L, L), float("-inf")), 1)
        return self.head(self.dec(self.tgt(x["tgt"]), memory, tgt_mask=mask))


# -- 4. embeddings -------------------------------------------------------------------------------------------------
class Bag(nn.Module):
    def __init__(self, mode="mean", weighted=False, classes=3):
        super().__init__()
        self.weighted = weighted
        self.bag = nn.EmbeddingBag(V, D, mode=mode)
        self.head = nn.Linear(D, classes)

    def forward(self, x):
        if isinstance(x, dict):
            return self.head(self.bag(x["tokens"], x["offsets"], per_sample_weights=x.get("w")))
        return self.head(self.bag(x))


class PaddedEmbedding(nn.Module):
    """``nn.Embedding(padding_idx=2, max_norm=None)`` (a pad id that is not 0), sum over tokens, a classifier."""

    def __init__(self, classes=3):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=2, max_norm=None)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, classes)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx).sum(1))))


# -- 5. recurrent cells in a loop ----------------------------------------------------------------------------------
class CellLoop(nn.Module):
    """GRUCell / LSTMCell called T times per forward on the [B, d] slices, a Linear on the last state (many to one)
    or on every state stacked (many to many, an LM)."""

    def __init__(self, kind="gru", lm=False):
        super().__init__()
        self.kind, self.lm = kind, lm
        self.emb = nn.Embedding(V, D)
        self.cell = nn.GRUCell(D, 6) if kind == "gru" else nn.LSTMCell(D, 6)
        self.head = nn.Linear(6, V if lm else 3)

    def forward(self, idx):
        e = self.emb(idx)
        B = idx.shape[0]
        h = e.new_zeros(B, 6)
        c = e.new_zeros(B, 6)
        outs = []
        for t in range(idx.shape[1]):
            if self.kind == "gru":
                h = self.cell(e[:, t], h)
            else:
                h, c = self.cell(e[:, t], (h, c))
            outs.append(h)
        return self.head(torch.stack(outs, 1)) if self.lm else self.head(h)


# -- 6. bfloat16 autocast on the CPU -------------------------------------------------------------------------------
def autocast_call(m, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return m(x)


def autocast_reference(u: Unseen, model: nn.Module):
    """(loss, [g_i per parameter [B, *shape]] float64, names) of the arithmetic an autocast run does: float32
    parameters, the batch's own autocast forward, g_i = B grad(loss | every other sample's output detached), one
    backward per sample through that graph. The float64 ``reference`` describes the float32 model instead; under
    bfloat16 the two can differ by several percent (a ReLU CNN's .grad itself: 6.5% on a conv bias)."""
    m = copy.deepcopy(model)
    ((x, y, _),) = u.micro
    out = u.call(m, x)
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for p in m.parameters() if p.requires_grad]
    grads = [[] for _ in params]
    for i in range(u.B):
        o = torch.cat([out[:i].detach(), out[i:i + 1], out[i + 1:].detach()])
        for j, g in enumerate(torch.autograd.grad(u.B * u.loss_fn(o, y), params, retain_graph=True)):
            grads[j].append(g.double())
    return float(u.loss_fn(out, y)), [torch.stack(g) for g in grads], names


def autocast_mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


# -- second round: forms around the first ---------------------------------------------------------------------
class AlbertCkpt(nn.Module):
    """ALBERT: one block shared by every layer, each application checkpointed (the block's calls recomputed in
    backward, twice per forward)."""

    def __init__(self, reentrant):
        super().__init__()
        self.r = reentrant
        self.tok = nn.Embedding(V, D)
        self.blk = Block()
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.tok(idx)
        for _ in range(2):
            x = checkpoint(self.blk, x, use_reentrant=self.r)
        return self.head(x)


class SharedInOut(nn.Module):
    """A LayerNorm used outside and inside a checkpointed closure (three calls, one recomputed)."""
    def __init__(self, reentrant):
        super().__init__()
        self.r = reentrant
        self.tok = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.ln(self.tok(idx))
        x = x + checkpoint(lambda h: self.mlp(self.ln(h)), x, use_reentrant=self.r)
        return self.head(self.ln(x))


class MaskBlock(nn.Module):
    """Self-attention with a per-sample [B, 1, 1, T] boolean mask passed positionally (through ``checkpoint``)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, x, mask):
        B, L, d = x.shape
        q, k, v = (t.view(B, L, 2, d // 2).transpose(1, 2) for t in self.qkv(x).split(d, -1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return x + self.proj(o.transpose(1, 2).reshape(B, L, d))


class HFCkpt(nn.Module):
    """Hugging Face's gradient checkpointing with an attention mask argument, masked mean pooling."""

    def __init__(self, reentrant):
        super().__init__()
        self.r = reentrant
        self.tok = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([MaskBlock(), MaskBlock()])
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        idx, am = x["input_ids"], x["attention_mask"]
        mask = am[:, None, None, :].bool()
        h = self.tok(idx)
        for b in self.blocks:
            h = checkpoint(b, h, mask, use_reentrant=self.r)
        keep = am.unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1))


class DWMult(nn.Module):
    """Grouped Conv2d with a channel multiplier, stride and dilation; grouped dilated ConvTranspose2d with
    output_padding."""

    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2, groups=2)
        self.tc = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.tc(torch.tanh(self.dw(x)))).mean((2, 3)))


class SameDilated1d(nn.Module):
    """Conv1d(padding="same", dilation=2) in each padding mode, a replicate-padded Conv1d, max over time with
    F.max_pool1d."""

    def __init__(self, mode="zeros"):
        super().__init__()
        self.a = nn.Conv1d(2, 4, 3, padding="same", dilation=2, padding_mode=mode)
        self.b = nn.Conv1d(4, 4, 3, padding=1, padding_mode="replicate")
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(F.max_pool1d(torch.tanh(self.b(torch.tanh(self.a(x)))), x.shape[-1]).squeeze(-1))


class SeqFirstEncoder(nn.Module):
    """Sequence-first ``nn.TransformerEncoder`` on [T, B] tokens with src_key_padding_mask."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        layer = nn.TransformerEncoderLayer(D, 2, 2 * D, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):  # [T, B]
        mask = (idx == 0).t()
        h = self.enc(self.emb(idx), src_key_padding_mask=mask)
        keep = (~mask).t().unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(0) / keep.sum(0))


class MHAForms(nn.Module):
    """nn.MultiheadAttention without biases and with add_zero_attn; with an additive float attn_mask and a
    key_padding_mask together; with its per-head attention weights used in the output."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(V, D)
        if kind == "nobias_zero":
            self.attn = nn.MultiheadAttention(D, 2, bias=False, add_zero_attn=True, batch_first=True)
        else:
            self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.emb(idx)
        L = idx.shape[1]
        if self.kind == "float_mask_kpm":
            am = torch.triu(torch.full((L, L), float("-inf")), 1) + 0.1 * torch.arange(L).float()
            kpm = idx == 1
            kpm[:, 0] = False
            o = self.attn(x, x, x, attn_mask=am, key_padding_mask=kpm)[0]
        elif self.kind == "weights_used":
            o, w = self.attn(x, x, x, need_weights=True, average_attn_weights=False)
            o = o + w.mean(1) @ x
        else:
            o = self.attn(x, x, x)[0]
        return self.head(o + x)


class Bag2(nn.Module):
    """EmbeddingBag on [B, L]: mode "max", padding_idx, per_sample_weights."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "max":
            self.bag = nn.EmbeddingBag(V, D, mode="max")
        elif kind == "padding":
            self.bag = nn.EmbeddingBag(V, D, mode="mean", padding_idx=0)
        else:
            self.bag = nn.EmbeddingBag(V, D, mode="sum")
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        if self.kind == "weighted_2d":
            return self.head(self.bag(x, per_sample_weights=(x.to(self.bag.weight.dtype) / V)))
        return self.head(self.bag(x))


class CellForms(nn.Module):
    """Cells in a loop, other ways: RNNCell from a learned initial state expanded over the batch; two GRUCells
    (forward and backward in time) started from None; LSTMCell with its state as the keyword hx / from None."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(V, D)
        if kind == "rnn_h0":
            self.h0 = nn.Parameter(0.1 * torch.randn(1, 6))
            self.cell = nn.RNNCell(D, 6)
        elif kind == "bi":
            self.f, self.b = nn.GRUCell(D, 6), nn.GRUCell(D, 6)
        else:
            self.cell = nn.LSTMCell(D, 6)
        self.head = nn.Linear(12 if kind == "bi" else 6, 3)

    def forward(self, idx):
        e = self.emb(idx)
        B, L = idx.shape
        if self.kind == "rnn_h0":
            h = self.h0.expand(B, -1)
            for t in range(L):
                h = self.cell(e[:, t], h)
            return self.head(h)
        if self.kind == "bi":
            hf = hb = None
            for t in range(L):
                hf = self.f(e[:, t], hf)
                hb = self.b(e[:, L - 1 - t], hb)
            return self.head(torch.cat([hf, hb], 1))
        st = None
        for t in range(L):
            st = self.cell(e[:, t], hx=st) if self.kind == "lstm_kw" else self.cell(e[:, t], st)
        return self.head(st[0])


class RNNUse(nn.Module):
    """nn.LSTM / nn.GRU (batch_first) read through h_n only, or through its output and h_n: a call whose later
    outputs receive gradient (rules.py sends it to the per-sample replay)."""

    def __init__(self, kind, use):
        super().__init__()
        self.use = use
        self.emb = nn.Embedding(V, 8)
        self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(8, 6, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, idx):
        out, st = self.rnn(self.emb(idx))
        h_n = st[0] if isinstance(st, tuple) else st
        return self.head(h_n[-1] if self.use == "h_n" else out[:, -1] + h_n[-1])


# -- checkpointing around parameters the layer rules do not serve (NaN with the reason) ------------------------------
class ScaledCkpt(nn.Module):
    """A bare scale vector on the root multiplied in (not an addition: no broadcast rule) before a checkpointed
    block: the fallback over the root module runs the checkpoint under torch.func."""

    def __init__(self, reentrant):
        super().__init__()
        self.r = reentrant
        self.tok = nn.Embedding(V, D)
        self.scale = nn.Parameter(1 + 0.1 * torch.randn(D))
        self.blk = Block()
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = checkpoint(self.blk, self.tok(idx) * self.scale, use_reentrant=self.r)
        return self.head(x)


class FunctionalCkpt(nn.Module):
    """``checkpoint(F.linear, x, W, b)`` with a module's weight passed explicitly, and a checkpointed closure over a
    bare parameter."""

    def __init__(self, reentrant):
        super().__init__()
        self.r = reentrant
        self.a = nn.Linear(5, 6)
        self.w = nn.Parameter(0.3 * torch.randn(6, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(checkpoint(F.linear, x, self.a.weight, self.a.bias, use_reentrant=self.r))
        h = checkpoint(lambda t: torch.tanh(t @ self.w), h, use_reentrant=self.r)
        return self.head(h)


class CkptMoELM(R4.MoELM):
    """Round 4's top-1 MoE LM with its MoE layer checkpointed: the experts' routed rows need the per-sample replay."""

    def __init__(self, reentrant):
        super().__init__(1)
        self.r = reentrant

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = x + checkpoint(lambda h: self.moe(self.ln(h)), x, use_reentrant=self.r)
        return self.head(self.lnf(x))


# -- cases ---------------------------------------------------------------------------------------------------------
def _take_dim1(x, i):
    return x[:, i:i + 1]


def _bags(B, seed, weighted=False):
    """Flat tokens with offsets: bag i holds 1 + (i % 3) tokens (the samples); ``take`` cuts bag i out."""
    g = torch.Generator().manual_seed(seed)
    sizes = [1 + i % 3 for i in range(B)]
    toks = torch.randint(0, V, (sum(sizes),), generator=g)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0)[:-1].tolist()])
    x = {"tokens": toks, "offsets": offsets}
    if weighted:
        x["w"] = torch.rand(sum(sizes), generator=g) + 0.5
    return x


def _take_bag(x, i):
    start = int(x["offsets"][i])
    stop = int(x["offsets"][i + 1]) if i + 1 < len(x["offsets"]) else len(x["tokens"])
    out = {"tokens": x["tokens"][start:stop], "offsets": torch.tensor([0])}
    if "w" in x:
        out["w"] = x["w"][start:stop]
    return out


def _take_dict(x, i):
    return {k: v[i:i + 1] for k, v in x.items()}


def cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    ce = nn.CrossEntropyLoss

    # 1. checkpointing
    for r in (False, True):
        name = f"checkpoint_gpt_{'reentrant' if r else 'nonreentrant'}"
        add(name, lambda r=r, name=name: Unseen(name, CheckpointGPT(r), ce(ignore_index=-100), [(*tokens(B), 1.0)],
                                                flat))
        name = f"checkpoint_sequential_{'reentrant' if r else 'nonreentrant'}"
        x5 = torch.randn(B, 5, generator=torch.Generator().manual_seed(21))
        add(name, lambda r=r, name=name, x5=x5: Unseen(name, CheckpointSequentialMLP(r), ce(), [(x5, labels(B), 1.0)]))

    # 2. convolutions
    g = torch.Generator().manual_seed(22)
    img = torch.randn(B, 2, 6, 6, generator=g)
    add("depthwise_separable", lambda: Unseen("depthwise_separable", DepthwiseSeparable(), ce(), [(img, labels(B), 1.0)]))
    add("dilated", lambda: Unseen("dilated", Dilated(), ce(), [(img, labels(B), 1.0)]))

    def channels_last():
        m = SmallCNN().to(memory_format=torch.channels_last)
        return Unseen("channels_last", m, ce(), [(img.to(memory_format=torch.channels_last), labels(B), 1.0)])
    add("channels_last", channels_last)
    g = torch.Generator().manual_seed(23)
    idx = torch.randint(0, V, (B, 6), generator=g)
    add("kim_cnn", lambda: Unseen("kim_cnn", KimCNN(), ce(), [(idx, labels(B), 1.0)]))
    seq, target = torch.randn(B, 2, 7, generator=g), torch.randn(B, 2, 7, generator=g)
    add("causal_tcn", lambda: Unseen("causal_tcn", TCN(), nn.MSELoss(), [(seq, target, 1.0)]))
    add("conv_transpose1d", lambda: Unseen("conv_transpose1d", TransposeDecoder(), ce(),
                                           [(torch.randn(B, 2, 4, generator=g), labels(B), 1.0)]))
    vol = torch.randn(B, 2, 4, 4, 4, generator=g)
    add("conv3d_strided_groups", lambda: Unseen("conv3d_strided_groups", Tiny3d(), ce(), [(vol, labels(B), 1.0)]))

    # 3. attention
    def seq_first():
        x, _ = tokens(B, seed=24, pad_y=False, pad_x=0)
        return Unseen("seq_first_mha", SeqFirstMHA(), ce(), [(x.t().contiguous(), labels(B), 1.0)], take=_take_dim1,
                      size=lambda x: int(x.shape[1]))
    add("seq_first_mha", seq_first)

    def seq2seq(bf):
        src, _ = tokens(B, seed=25, pad_y=False)
        tgt, y = tokens(B, seed=26)
        name = f"seq2seq_{'batch_first' if bf else 'seq_first'}"
        return Unseen(name, Seq2Seq(bf), ce(ignore_index=-100), [({"src": src, "tgt": tgt}, y, 1.0)], flat,
                      take=_take_dict, size=lambda x: int(x["src"].shape[0]))
    add("seq2seq_batch_first", lambda: seq2seq(True))
    add("seq2seq_seq_first", lambda: seq2seq(False))

    def decoder_memory():
        gg = torch.Generator().manual_seed(27)
        tgt, y = tokens(B, seed=28)
        x = {"feat": torch.randn(B, 3, 6, generator=gg), "tgt": tgt}
        return Unseen("decoder_memory", DecoderWithMemory(), ce(ignore_index=-100), [(x, y, 1.0)], flat,
                      take=_take_dict, size=lambda x: int(x["feat"].shape[0]))
    add("decoder_memory", decoder_memory)

    # 4. embeddings
    for mode in ("mean", "sum"):
        add(f"bag_{mode}_offsets", lambda mode=mode: Unseen(f"bag_{mode}_offsets", Bag(mode), ce(),
                                                            [(_bags(B, 29), labels(B), 1.0)], take=_take_bag,
                                                            size=lambda x: len(x["offsets"])))
        add(f"bag_{mode}_2d", lambda mode=mode: Unseen(f"bag_{mode}_2d", Bag(mode), ce(),
                                                       [(tokens(B, seed=30)[0], labels(B), 1.0)]))
    add("bag_sum_weighted", lambda: Unseen("bag_sum_weighted", Bag("sum", True), ce(),
                                           [(_bags(B, 31, True), labels(B), 1.0)], take=_take_bag,
                                           size=lambda x: len(x["offsets"])))
    add("embedding_padding_idx", lambda: Unseen("embedding_padding_idx", PaddedEmbedding(), ce(),
                                                [(tokens(B, seed=32, pad_x=2)[0], labels(B), 1.0)]))

    # 5. cells in a loop
    for kind in ("gru", "lstm"):
        add(f"{kind}_cell_loop", lambda kind=kind: Unseen(f"{kind}_cell_loop", CellLoop(kind), ce(),
                                                          [(tokens(B, seed=33)[0], labels(B), 1.0)]))
        add(f"{kind}_cell_loop_lm", lambda kind=kind: Unseen(f"{kind}_cell_loop_lm", CellLoop(kind, True),
                                                             ce(ignore_index=-100), [(*tokens(B, seed=34), 1.0)], flat))

    # 6. autocast
    x5 = torch.randn(B, 5, generator=torch.Generator().manual_seed(35))
    add("autocast_bf16_mlp", lambda: Unseen("autocast_bf16_mlp", autocast_mlp(), ce(), [(x5, labels(B), 1.0)],
                                            call=autocast_call))
    add("autocast_bf16_cnn", lambda: Unseen("autocast_bf16_cnn", SmallCNN(), ce(), [(img, labels(B), 1.0)],
                                            call=autocast_call))
    add("autocast_bf16_gru_cell_loop", lambda: Unseen("autocast_bf16_gru_cell_loop", CellLoop("gru"), ce(),
                                                      [(tokens(B, seed=33)[0], labels(B), 1.0)], call=autocast_call))
    return out


def more_cases(B: int = 4) -> Dict[str, Callable[[], Unseen]]:
    out, add = seeded_cases()
    ce = nn.CrossEntropyLoss
    for r in (False, True):
        sfx = "re" if r else "nonre"
        add(f"albert_ckpt_{sfx}", lambda r=r: Unseen("a", AlbertCkpt(r), ce(ignore_index=-100), [(*tokens(B), 1.0)], flat))
        add(f"shared_in_out_{sfx}", lambda r=r: Unseen("s", SharedInOut(r), ce(ignore_index=-100), [(*tokens(B), 1.0)], flat))
        def hf(r=r):
            x, _ = tokens(B, seed=3)
            am = torch.ones(B, T, dtype=torch.long)
            for i in range(B):
                am[i, T - i:] = 0
            return Unseen("hf", HFCkpt(r), ce(), [({"input_ids": x, "attention_mask": am}, labels(B), 1.0)],
                          take=_take_dict, size=lambda x: int(x["input_ids"].shape[0]))
        add(f"hf_ckpt_{sfx}", hf)
        def accum(r=r):
            x, y = tokens(6, seed=5)
            return Unseen("acc", AlbertCkpt(r), ce(ignore_index=-100), [(x[:2], y[:2], 2 / 6), (x[2:], y[2:], 4 / 6)], flat)
        add(f"albert_ckpt_accum_{sfx}", accum)
    g = torch.Generator().manual_seed(40)
    img = torch.randn(B, 2, 7, 7, generator=g)
    add("dw_mult_transpose2d", lambda: Unseen("dw", DWMult(), ce(), [(img, labels(B), 1.0)]))
    s1 = torch.randn(B, 2, 7, generator=g)
    for mode in ("zeros", "circular", "reflect"):
        add(f"same_dilated_1d_{mode}", lambda mode=mode: Unseen("s1", SameDilated1d(mode), ce(), [(s1, labels(B), 1.0)]))
    def sfe():
        x, _ = tokens(B, seed=24, pad_y=False, pad_x=0)
        return Unseen("sfe", SeqFirstEncoder(), ce(), [(x.t().contiguous(), labels(B), 1.0)], take=_take_dim1,
                      size=lambda x: int(x.shape[1]))
    add("seq_first_encoder", sfe)
    for k in ("nobias_zero", "float_mask_kpm", "weights_used"):
        add(f"mha_{k}", lambda k=k: Unseen(k, MHAForms(k), ce(ignore_index=-100), [(*tokens(B, seed=7), 1.0)], flat))
    for k in ("max", "padding", "weighted_2d"):
        add(f"bag2_{k}", lambda k=k: Unseen(k, Bag2(k), ce(), [(tokens(B, seed=8, pad_x=0)[0], labels(B), 1.0)]))
    for r in (False, True):
        sfx = "re" if r else "nonre"
        add(f"scaled_ckpt_{sfx}", lambda r=r: Unseen("sc", ScaledCkpt(r), ce(ignore_index=-100), [(*tokens(B), 1.0)],
                                                     flat))
        x5 = torch.randn(B, 5, generator=torch.Generator().manual_seed(50))
        add(f"functional_ckpt_{sfx}", lambda r=r, x5=x5: Unseen("fc", FunctionalCkpt(r), ce(), [(x5, labels(B), 1.0)]))
        add(f"ckpt_moe_{sfx}", lambda r=r: Unseen("cm", CkptMoELM(r), ce(ignore_index=-100), [(*R4.tokens(B), 1.0)],
                                                  flat))
    for k in ("rnn_h0", "bi", "lstm_kw", "lstm_none"):
        add(f"cell_{k}", lambda k=k: Unseen(k, CellForms(k), ce(), [(tokens(B, seed=9)[0], labels(B), 1.0)]))
    for kind in ("lstm", "gru"):
        for use in ("h_n", "both"):
            add(f"{kind}_{use}", lambda kind=kind, use=use: Unseen(f"{kind}_{use}", RNNUse(kind, use), ce(),
                                                                   [(tokens(B, seed=70)[0], labels(B), 1.0)]))
    add("autocast_bf16_cell_rnn_h0", lambda: Unseen("autocast_bf16_cell_rnn_h0", CellForms("rnn_h0"), ce(),
                                                    [(tokens(B, seed=9)[0], labels(B), 1.0)], call=autocast_call))
    return out
