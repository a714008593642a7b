"""nn.MultiheadAttention inside whole models, through the cockpit (the tapped projections on a tracked
step): an encoder with a causal mask and key padding, and a decoder with self- and cross-attention
(packed weights, distinct query and memory); per-sample gradients of every parameter against a float64
loop of autograd over single sequences."""

import pytest
import torch
from torch import nn

from cockpit_lite.persample import attention, rules
from test_persample_view import SeqCE, ce_seq_none, check_against, run_probe

V, D, H, T = 11, 8, 2, 5


class CausalEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, 12, dropout=0.0, batch_first=True,
                                                                    norm_first=True), 2, enable_nested_tensor=False)
        self.out = nn.Linear(D, V)

    def forward(self, idx):
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        pad = idx == 0  # token 0 is padding: not attended
        return self.out(self.enc(self.emb(idx), mask=mask, src_key_padding_mask=pad, is_causal=True))


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.memory = nn.Linear(3, D)
        self.dec = nn.TransformerDecoderLayer(D, H, 12, dropout=0.0, batch_first=True)
        self.out = nn.Linear(D, V)

    def forward(self, idx):
        mem = self.memory(torch.linspace(-1, 1, 4 * 3, dtype=self.memory.weight.dtype).reshape(1, 4, 3).expand(idx.shape[0], -1, -1) * idx[:, :1, None])
        return self.out(self.dec(self.emb(idx), mem))


class SharedTwice(nn.Module):
    """One attention module called twice in a forward (its per-sample gradients add up), the second
    time with per-head weights asked for."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.out = nn.Linear(D, V)

    def forward(self, idx):
        h = self.emb(idx)
        h = h + self.mha(h, h, h)[0]
        return self.out(h + self.mha(h, h, h, need_weights=True, average_attn_weights=False)[0])


class KeyIsValue(nn.Module):
    """Packed weights, the query distinct from key = value: W_in split into rows [E] and [2E]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mem = nn.Parameter(torch.randn(3, D))
        self.mha = nn.MultiheadAttention(D, H, batch_first=True)
        self.out = nn.Linear(D, V)

    def forward(self, idx):
        h = self.emb(idx)
        m = torch.tanh(h[:, :3] + self.mem)
        return self.out(h + self.mha(h, m, m)[0])


def _idx(seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(1, V, (4, T), generator=g)
    idx[1, -2:] = 0
    return idx, torch.randint(0, V, (4, T), generator=g)


@pytest.fixture
def routes(monkeypatch):
    """How the attention calls were served: "taps" or "fallback" (one entry per call)."""
    seen = []
    taps, fallback = attention._from_taps, rules.fallback_samples

    def from_taps(*a):
        out = taps(*a)
        if out is not None:
            seen.append("taps")
        return out

    def fallback_samples(*a):
        if isinstance(a[0], nn.MultiheadAttention):  # (another module may take it: a root's bare parameter)
            seen.append("fallback")
        return fallback(*a)

    monkeypatch.setattr(attention, "_from_taps", from_taps)
    monkeypatch.setattr(rules, "fallback_samples", fallback_samples)
    return seen


@pytest.mark.parametrize("make, seed", [(CausalEncoder, 1), (Decoder, 2)])
def test_every_attention_call_is_tapped_and_exact(tmp_path, routes, make, seed):
    """Two calls each: the encoder's two self-attention layers; the decoder's self-attention and its
    packed cross-attention."""
    torch.manual_seed(seed)
    model = make().double()
    idx, y = _idx(seed)
    probe = run_probe(model, SeqCE("sum"), [(idx, y)], tmp_path)
    check_against(probe, model, ce_seq_none, [(idx, y)], rtol=1e-6, atol=1e-9)
    assert routes == ["taps", "taps"]


@pytest.mark.parametrize("make", [SharedTwice, KeyIsValue])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_shared_calls_and_key_is_value_with_accumulation(tmp_path, routes, make, micro_batches):
    torch.manual_seed(0)
    model = make().double()
    batches = [_idx(10 + k) for k in range(micro_batches)]
    probe = run_probe(model, SeqCE("sum"), batches, tmp_path)
    check_against(probe, model, ce_seq_none, batches, rtol=1e-6, atol=1e-9)
    assert routes and set(routes) == {"taps"}
