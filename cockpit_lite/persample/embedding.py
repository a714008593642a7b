"""nn.Embedding: g_i(E)[v] = sum_{t: idx_{i,t} = v} delta_{i,t} (padding_idx rows get no gradient).

The tokens of a sample that share an index are first summed (one index_add over the b*T rows), so
||g_i||^2, sum_i g_i^2, g_i . V and the histogram of the elements cost O(b T E): no [b, V, E] tensor
except for ``materialize`` (the rows a sample did not use are exact zeros, counted without forming them).
"""

from __future__ import annotations

import torch

from .samples import ParamSamples, _histc, to_float


class EmbeddingWeightSamples(ParamSamples):
    cheap_max = True

    def materializes(self, stat: str) -> bool:
        return False

    def __init__(self, idx_bt: torch.Tensor, D_bte: torch.Tensor, num_embeddings: int, padding_idx):
        b, T, E = D_bte.shape
        self.b, self.V, self.E = b, num_embeddings, E
        self.shape = torch.Size((num_embeddings, E))
        sample = torch.arange(b, device=idx_bt.device).unsqueeze(1).expand(b, T)
        keep = torch.ones_like(idx_bt, dtype=torch.bool) if padding_idx is None else idx_bt != padding_idx
        self.idx = idx_bt[keep]  # [N]
        self.sample = sample[keep]
        self.D = D_bte[keep]  # [N, E]
        key = self.sample * num_embeddings + self.idx
        uniq, inverse = torch.unique(key, return_inverse=True)
        self.S = torch.zeros(len(uniq), E, dtype=D_bte.dtype, device=D_bte.device).index_add_(0, inverse, self.D)
        self.S_sample = torch.div(uniq, num_embeddings, rounding_mode="floor")
        self.S_idx = uniq % num_embeddings

    def materialize(self) -> torch.Tensor:
        G = torch.zeros(self.b, self.V, self.E, dtype=self.S.dtype, device=self.S.device)
        G[self.S_sample, self.S_idx] = self.S
        return G

    def sq_norms(self) -> torch.Tensor:
        return torch.zeros(self.b, dtype=self.S.dtype, device=self.S.device).index_add_(
            0, self.S_sample, self.S.pow(2).sum(1))

    def dots(self, v: torch.Tensor) -> torch.Tensor:
        per_row = (self.S * v.to(self.S.dtype)[self.S_idx]).sum(1)
        return torch.zeros(self.b, dtype=self.S.dtype, device=self.S.device).index_add_(0, self.S_sample, per_row)

    def second_moment(self) -> torch.Tensor:
        return torch.zeros(self.V, self.E, dtype=self.S.dtype, device=self.S.device).index_add_(
            0, self.S_idx, self.S.pow(2))

    def total(self) -> torch.Tensor:
        return torch.zeros(self.V, self.E, dtype=self.S.dtype, device=self.S.device).index_add_(0, self.S_idx, self.S)

    def max_abs(self) -> torch.Tensor:
        return self.S.abs().max() if self.S.numel() else torch.zeros((), dtype=self.S.dtype)

    def histogram(self, R: float, bins: int):
        """As ``ParamSamples.histogram``: the rows the samples used, then every other element (an exact
        zero) in the bin of zero, bins // 2, as ``_histc`` places zeros."""
        counts, top, clipped = torch.zeros(bins, dtype=torch.float64), 0.0, 0
        if self.S.numel():
            counts, top, clipped = _histc(self.S, R, bins)
        counts[bins // 2] += float(self.b * self.V * self.E - self.S.numel())
        return counts, top, clipped


def embedding_samples(module: torch.nn.Embedding, idx: torch.Tensor, delta: torch.Tensor):
    b = idx.shape[0]
    D = to_float(delta).reshape(b, -1, delta.shape[-1])
    return {"weight": EmbeddingWeightSamples(idx.reshape(b, -1), D, module.num_embeddings, module.padding_idx)}
