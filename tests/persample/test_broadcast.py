"""Layers called without the batch dimension and added to a batch (persample/broadcast.py): a position table on
arange(T) ([T, d]), on position ids of shape [1, T] ([1, T, d]), a Linear on eye(T). Read at the addition that
broadcasts them, their per-sample gradients are exact (float64 brute force over single sequences); tables that
reach the batch some other way (scaled first, added twice, subtracted) keep the per-sample replay, also exact.
T5's relative attention bias reaches its addition through permute / unsqueeze / clone: undone per sample.
Stock Hugging Face GPT-2, BERT and RoBERTa (position_ids [1, T]): tests/integrations/test_integration_hf_models.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as R
from sequence_truth import TESTS, per_sequence_grads, watched_step

B, T, V, D = 4, 5, 7, 6


class Table(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Linear(T, D) if how == "linear_eye" else nn.Embedding(T, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        L = idx.shape[1]
        ar = torch.arange(L)
        if self.how == "linear_eye":
            pos = self.pos(torch.eye(L, T, dtype=self.pos.weight.dtype))
        elif self.how == "ids":
            pos = self.pos(ar.unsqueeze(0))
        else:
            pos = self.pos(ar)
        x = self.tok(idx)
        if self.how == "scaled":
            h = x + 0.5 * pos
        elif self.how == "sub":
            h = x - pos
        else:
            h = x + pos
        h = torch.tanh(self.mix(h))
        if self.how == "twice":
            h = h + pos
        return self.head(h)


class RelBias(nn.Module):
    """T5's relative attention bias: an embedding of the [T, T] relative positions, [T, T, H], permuted to
    [1, H, T, T] (and cloned) before it is added to the attention scores of the batch."""

    def __init__(self, heads=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads = heads
        self.tok = nn.Embedding(V, D)
        self.rel = nn.Embedding(2 * T - 1, heads)
        self.qk = nn.Linear(D, 2 * D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        L = idx.shape[1]
        h = self.tok(idx)
        q, k = self.qk(h).view(idx.shape[0], L, 2, self.heads, D // self.heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)
        rel = torch.arange(L)[None, :] - torch.arange(L)[:, None] + T - 1
        bias = self.rel(rel).permute(2, 0, 1).unsqueeze(0).clone()  # [1, H, T, T]
        att = torch.softmax(scores + bias, -1)
        out = torch.einsum("bhqk,bkhd->bqhd", att, h.view(idx.shape[0], L, self.heads, -1)).reshape(h.shape)
        return self.head(out)


HOWS = ["arange", "ids", "linear_eye", "scaled", "sub", "twice", "relative_bias"]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("how", HOWS)
def test_tables_broadcast_over_the_batch_are_exact(tmp_path, how):
    model = RelBias() if how == "relative_bias" else Table(how)
    x, y = _batch()
    G, parts = per_sequence_grads(model, (x,), y, V)
    rec = watched_step(model, (x,), y, V, tmp_path)
    assert rec["samples"] == B
    for q in TESTS:
        assert rec["values"][q] == pytest.approx(getattr(R, q)(G), rel=1e-4), (q, rec.get("reasons", {}).get(q))
        for name in ("rel.weight", "tok.weight") if how == "relative_bias" else ("pos.weight", "tok.weight"):
            want = getattr(R, q)(parts[name])
            assert rec["values"][f"{q}/{name}"] == pytest.approx(want, rel=1e-4), (q, name)
