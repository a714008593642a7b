"""Models as people write them (issue 19): builders for the real-model tests and the support matrix.

Each builder returns a ``Case``: the model, the loss module, a batch and how the user's loop feeds the
loss (``loss_input(out, y) -> (input, target)``: the reshape the user writes between model output and
loss). ``per_sample(model, x, y)`` is the brute-force reference's l_i for one sample (batch of one).
Small sizes on purpose: the float64 references loop over samples and build dense Hessians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch import nn
from torch.nn import functional as F

V, T, D, H = 11, 5, 8, 2  # vocabulary, sequence length, width, heads


# -- building blocks ------------------------------------------------------------------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int = D, heads: int = H):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, L, C))


class Block(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """nanoGPT's shape: token + learned position embedding (called on arange(T), broadcast over the batch),
    causal attention, lm_head tied to the token embedding. ``positions``: 'arange' (pos(arange(T))),
    'ids' (pos(position_ids) with position_ids of shape (1, T), the Hugging Face way) or 'param' (a bare
    nn.Parameter table on the root module). ``tie``: 'module' (lm_head.weight = wte.weight, nanoGPT),
    'functional' (F.linear(h, wte.weight)) or None."""

    def __init__(self, positions: str = "arange", tie: Optional[str] = "module", layers: int = 1):
        super().__init__()
        self.positions, self.tie = positions, tie
        self.wte = nn.Embedding(V, D)
        if positions == "param":
            self.wpe = nn.Parameter(0.1 * torch.randn(T, D))
        else:
            self.wpe = nn.Embedding(T, D)
        self.blocks = nn.ModuleList(Block() for _ in range(layers))
        self.ln_f = nn.LayerNorm(D)
        if tie != "functional":
            self.lm_head = nn.Linear(D, V, bias=False)
            if tie == "module":
                self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        L = idx.shape[1]
        if self.positions == "param":
            pos = self.wpe[:L]
        elif self.positions == "ids":
            pos = self.wpe(torch.arange(L, device=idx.device).unsqueeze(0))
        else:
            pos = self.wpe(torch.arange(L, device=idx.device))
        x = self.wte(idx) + pos
        for b in self.blocks:
            x = b(x)
        h = self.ln_f(x)
        return F.linear(h, self.wte.weight) if self.tie == "functional" else self.lm_head(h)


class BiasTable(nn.Module):
    """A learned [T, d] table added to a batch inside forward, through a submodule called without the batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.table = nn.Linear(T, D)  # called on eye(T): output [T, D] broadcast over the batch
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.emb(idx) + self.table(torch.eye(idx.shape[1], T, dtype=self.table.weight.dtype))
        return self.head(torch.tanh(x))


class SeqFirstRNN(nn.Module):
    """Sequence-first recurrent LM: input [T, B] tokens, output [T, B, V] (batch_first=False)."""

    def __init__(self, kind: str = "gru"):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](D, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h, _ = self.rnn(self.emb(idx))
        return self.head(h)


class RNNLM(nn.Module):
    """Batch-first recurrent LM read through its output sequence."""

    def __init__(self, kind: str = "gru"):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](D, D, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        return self.head(self.rnn(self.emb(idx))[0])


class RNNClassifier(nn.Module):
    """Batch-first recurrent classifier read through its last hidden state h_n."""

    def __init__(self, kind: str = "gru"):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](D, D, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, idx):
        out = self.rnn(self.emb(idx))[1]
        h = out[0] if isinstance(out, tuple) else out
        return self.head(h[-1])


class SeqFirstMHA(nn.Module):
    """Sequence-first encoder: nn.MultiheadAttention without batch_first, input [T, B] tokens."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.attn = nn.MultiheadAttention(D, H)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        x = self.emb(idx)
        return self.head(self.attn(x, x, x, need_weights=False)[0] + x)


class FlattenInLoss(nn.Module):
    """A loss module that flattens the logits itself: crit(logits, y) with logits [B, T, V]."""

    def __init__(self, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, logits, y):
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                               ignore_index=self.ignore_index, reduction=self.reduction)


# -- cases ----------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    loss_input: Callable  # (model output, y) -> (loss input, loss target), as the user's loop writes it
    batch_dim: int = 0  # of x and y
    layout: str = "batch-first"
    notes: Dict[str, str] = field(default_factory=dict)

    @property
    def B(self) -> int:
        return int(self.x.shape[self.batch_dim])

    def loss(self, model=None, x=None, y=None):
        out = (model or self.model)(self.x if x is None else x)
        return self.loss_fn(*self.loss_input(out, self.y if y is None else y))


def _flat(out, y):
    return out.view(-1, out.shape[-1]), y.view(-1)


def lm_tokens(B: int = 4, pad: bool = True, seed: int = 0, seq_first: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    if pad:  # right padding of unequal lengths, ignored by the loss
        for i in range(B):
            n = (i * 2) % T
            if n:
                y[i, T - n:] = -100
    if seq_first:
        x, y = x.t().contiguous(), y.t().contiguous()
    return x, y


def cases(B: int = 4, seed: int = 0) -> Dict[str, Callable[[], Case]]:
    """name -> builder; every builder seeds torch so the model is the same each time."""

    def seeded(f):
        def build():
            torch.manual_seed(seed)
            return f()
        return build

    ce = lambda: nn.CrossEntropyLoss(ignore_index=-100)
    out: Dict[str, Callable[[], Case]] = {}

    def gpt(positions, tie, loss_input=_flat, loss=None, name=None):
        def f():
            x, y = lm_tokens(B, seed=seed)
            return Case(name, TinyGPT(positions, tie), loss or ce(), x, y, loss_input)
        out[name] = seeded(f)

    gpt("arange", "module", name="nanogpt")
    gpt("ids", "module", name="gpt_position_ids")
    gpt("param", None, name="gpt_param_table")
    gpt("arange", "functional", name="gpt_flinear_tie")
    gpt("arange", "module", loss_input=lambda o, y: (o.reshape(-1, V), y.reshape(-1)), name="gpt_reshape")
    gpt("arange", "module", loss_input=lambda o, y: (o.flatten(0, 1), y.flatten()), name="gpt_flatten")
    gpt("arange", "module", loss_input=lambda o, y: (o.transpose(1, 2), y), name="gpt_transpose")
    gpt("arange", "module", loss_input=lambda o, y: (o, y), loss=FlattenInLoss(), name="gpt_loss_module")
    gpt("arange", "module", loss=nn.CrossEntropyLoss(ignore_index=-100, reduction="sum"), name="gpt_sum")

    def bias_table():
        x, y = lm_tokens(B, seed=seed)
        return Case("bias_table", BiasTable(), ce(), x, y, _flat)
    out["bias_table"] = seeded(bias_table)

    for kind in ("gru", "lstm", "rnn"):
        def seq_first(kind=kind):
            x, y = lm_tokens(B, seed=seed, seq_first=True)
            return Case(f"seq_first_{kind}", SeqFirstRNN(kind), ce(), x, y, _flat, batch_dim=1, layout="sequence-first")
        out[f"seq_first_{kind}"] = seeded(seq_first)

        def rnn_lm(kind=kind):
            x, y = lm_tokens(B, seed=seed)
            return Case(f"{kind}_lm", RNNLM(kind), ce(), x, y, _flat)
        out[f"{kind}_lm"] = seeded(rnn_lm)

        def classifier(kind=kind):
            g = torch.Generator().manual_seed(seed)
            x = torch.randint(0, V, (B, T), generator=g)
            y = torch.randint(0, 3, (B,), generator=g)
            return Case(f"{kind}_h_n", RNNClassifier(kind), nn.CrossEntropyLoss(), x, y, lambda o, y: (o, y))
        out[f"{kind}_h_n"] = seeded(classifier)

    def mha():
        x, y = lm_tokens(B, seed=seed, seq_first=True)
        return Case("seq_first_mha", SeqFirstMHA(), ce(), x, y, _flat, batch_dim=1, layout="sequence-first")
    out["seq_first_mha"] = seeded(mha)
    return out


# -- brute-force reference -----------------------------------------------------------------------------------------
def reference_losses_and_grads(case: Case, model=None):
    """(l [B], [g_i per parameter, [B, *shape]], names) in float64 by a loop over single samples.

    l_i is sample i's share of the mini-batch loss (QUANTITIES.md / persample/losses.py): with mean
    reduction and ignored targets, the sum of its token losses divided by the mini-batch's number of
    counted tokens, times B (so that the loss is the mean of the l_i)."""
    import copy

    m = copy.deepcopy(model or case.model).double()
    names = [n for n, _ in m.named_parameters()]
    params = [p for _, p in m.named_parameters()]
    fn = copy.copy(case.loss_fn)
    fn.reduction = "sum"
    total_fn = copy.copy(case.loss_fn)
    with torch.no_grad():  # the normaliser: sum of elements / mean loss of the whole batch
        full = float(total_fn(*case.loss_input(m(case.x), case.y)))
        summed = float(fn(*case.loss_input(m(case.x), case.y)))
    B = case.B
    scale = 1.0 if case.loss_fn.reduction == "sum" else (B * full / summed if summed else 0.0)
    losses, grads = [], [torch.zeros(B, *p.shape, dtype=torch.float64) for p in params]
    for i in range(B):
        xi = case.x.narrow(case.batch_dim, i, 1)
        yi = case.y.narrow(case.batch_dim, i, 1)
        li = fn(*case.loss_input(m(xi), yi)) * scale
        gs = torch.autograd.grad(li, params, allow_unused=True)
        losses.append(float(li.detach()))
        for k, g in enumerate(gs):
            if g is not None:
                grads[k][i] = g
    return torch.tensor(losses, dtype=torch.float64), grads, names


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
