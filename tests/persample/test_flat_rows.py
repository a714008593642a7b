"""Row-wise layers called on the batch's positions flattened into rows (persample/flat_rows.py): an MLP block on
``h.reshape(-1, d)`` (Hugging Face OPT's layout), a LayerNorm on the rows, dropout and a scaled activation in
between. Read as calls on [B, T, d], every gradient test equals the float64 brute force over single sequences.
Rows flattened sequence-first (``h.transpose(0, 1).reshape(-1, d)``) group positions, not samples: exact
from the per-sample replay or NaN with the reason, never grouped as samples."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import reference as R
from sequence_truth import TESTS, per_sequence_grads, watched_step

B, T, V, D = 4, 5, 7, 6


class FlatBlock(nn.Module):
    def __init__(self, order: str):
        super().__init__()
        torch.manual_seed(0)
        self.order = order
        self.tok = nn.Embedding(V, D)
        self.ln = nn.LayerNorm(D)
        self.fc1, self.fc2 = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.drop = nn.Dropout(0.0)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h = self.tok(idx)
        shape = h.shape
        if self.order == "sequence_first":
            rows = h.transpose(0, 1).reshape(-1, D)
        else:
            rows = h.reshape(-1, D)
        r = self.fc2(self.drop(0.5 * torch.nn.functional.gelu(self.fc1(self.ln(rows)))))
        if self.order == "sequence_first":
            r = r.view(shape[1], shape[0], D).transpose(0, 1)
        else:
            r = r.view(shape)
        return self.head(h + r)


@pytest.mark.parametrize("order", ["batch_first", "sequence_first"])
def test_flattened_rows_are_grouped_by_sample(tmp_path, order):
    model = FlatBlock(order)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    G, parts = per_sequence_grads(model, (x,), y, V)
    rec = watched_step(model, (x,), y, V, tmp_path)
    values, reasons = rec["values"], rec.get("reasons", {})
    for q in TESTS:
        for key, want in [(q, getattr(R, q)(G))] + [(f"{q}/{n}", getattr(R, q)(P)) for n, P in parts.items()]:
            v = float(values[key])
            if math.isnan(v):
                assert order == "sequence_first" and reasons.get(key), (key, reasons.get(key))
            else:
                assert v == pytest.approx(want, rel=1e-4, abs=1e-7), key
    if order == "batch_first":
        assert not any(k.startswith(TESTS) for k in reasons), reasons
