"""Modules that look like the layers the rules know but are not (persample/rules.py, fallback.py):

* a subclass of nn.Linear / nn.Embedding that replaces ``forward`` (a scaled output; a learned position
  embedding computing its indices from the attention mask and ``position_ids=`` as OPT's does): the rule of
  the base class would differentiate the wrong function; the fallback differentiates the module's own;
* a parameter held by a module and by its submodule (RoBERTa's ``lm_head.bias is lm_head.decoder.bias``):
  counted once, by the submodule's call.

Every gradient test, total and per parameter, against a float64 brute force over single samples.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference as R
from sequence_truth import TESTS, per_sequence_grads, watched_step

B, T, V, D = 4, 5, 9, 6


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * super().forward(x) + 0.5


class MaskPositions(nn.Embedding):
    """OPT-style: positions from the attention mask's cumulative sum (or given ``position_ids``), offset 2."""

    def forward(self, attention_mask, position_ids=None):
        if position_ids is None:
            position_ids = (torch.cumsum(attention_mask, dim=1) * attention_mask).long() - 1
        return super().forward(position_ids + 2)


class TiedHead(nn.Module):
    """RoBERTa's LM head: its own ``bias`` is the decoder's."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(D, D)
        self.decoder = nn.Linear(D, V)
        self.bias = nn.Parameter(torch.zeros(V))
        self.decoder.bias = self.bias

    def forward(self, h):
        return self.decoder(torch.tanh(self.dense(h)))


class Model(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        torch.manual_seed(0)
        self.kind = kind
        self.tok = nn.Embedding(V, D)
        self.pos = MaskPositions(T + 3, D)
        self.mix = ScaledLinear(D, D) if kind == "scaled_linear" else nn.Linear(D, D)
        self.head = TiedHead() if kind == "tied_head" else nn.Linear(D, V)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.1 * torch.randn_like(p))

    def forward(self, idx, mask):
        if self.kind == "position_ids":
            pos = self.pos(mask, position_ids=(torch.cumsum(mask, dim=1) * mask).long() - 1)
        else:
            pos = self.pos(mask)
        return self.head(torch.tanh(self.mix(self.tok(idx) + pos)))


def _batch():
    g = torch.Generator().manual_seed(3)
    idx, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 3:] = 0
    mask[2, 4:] = 0
    return idx, mask, y


@pytest.mark.parametrize("kind", ["mask_positions", "position_ids", "scaled_linear", "tied_head"])
def test_module_forms_are_exact(tmp_path, kind):
    model = Model(kind)
    idx, mask, y = _batch()
    G, parts = per_sequence_grads(model, (idx, mask), y, V)
    rec = watched_step(model, (idx, mask), y, V, tmp_path)
    values, reasons = rec["values"], rec.get("reasons", {})
    for q in TESTS:
        assert values[q] == pytest.approx(getattr(R, q)(G), rel=1e-4), (q, reasons.get(q))
        for name, P in parts.items():
            key = f"{q}/{name}"
            if key in reasons:  # only float32's resolution limits (quantities/_resolution.py) may leave one out
                assert "float32" in reasons[key], (key, reasons[key])
                continue
            assert values[key] == pytest.approx(getattr(R, q)(P), rel=1e-4, abs=1e-7), key
