"""Forwards that handle the batch in their own way: in chunks, or sequence-first inputs pooled into [B, C].

A module run over the batch in chunks inside forward: its calls see different samples, not the same ones.

``head(torch.cat([enc(c) for c in x.split(k)]))`` (memory saving, or a per-sample loop for inputs of varying
size) made the layer rules take the chunk's rows as the batch and add the calls up per row, as for a Siamese
model whose calls see the same samples: finite, wrong per-sample values (norm_test/enc.0.weight 1.080 for
0.993, a histogram of half the elements). The per-sample replay over the model inputs gives them; a module
called on the same rows several times (a recurrent cell over time steps) keeps its rule. Reference: per-sample
gradients by autograd, one sample at a time, in float64."""

import math

import pytest
import torch
from torch import nn

import cockpit_lite


class Chunks(nn.Module):
    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk
        self.enc, self.head = nn.Sequential(nn.Linear(6, 8), nn.Tanh()), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([self.enc(c) for c in x.split(self.chunk)]))


class Cell(nn.Module):
    """One Linear cell applied at every time step to the same B samples (calls of B rows, T of them)."""

    def __init__(self, chunk=None):
        super().__init__()
        self.cell, self.head = nn.Linear(6 + 8, 8), nn.Linear(8, 3)

    def forward(self, x):  # x: [B, T, 6]
        h = x.new_zeros(x.shape[0], 8)
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], 1)))
        return self.head(h)


def _reference(model, x, y):
    """{name: [B, numel]} per-sample gradients of l_i (cross-entropy of sample i alone), float64."""
    m = type(model)(getattr(model, "chunk", None)).double()
    m.load_state_dict(model.state_dict())
    out = {n: [] for n, _ in m.named_parameters()}
    for i in range(x.shape[0]):
        m.zero_grad()
        nn.functional.cross_entropy(m(x[i:i + 1].double()), y[i:i + 1]).backward()
        for n, p in m.named_parameters():
            out[n].append(p.grad.reshape(-1).clone())
    return {n: torch.stack(v) for n, v in out.items()}


def _norm_test(G):
    B, g = G.shape[0], G.mean(0)
    return math.sqrt(((G ** 2).sum() / (g @ g) - B) / (B * (B - 1)))


@pytest.mark.parametrize("case", ["chunks of 4, batch 4 then 8", "chunks of 1", "uneven chunks", "cell over time"])
def test_per_sample_values_of_a_chunked_forward(tmp_path, case):
    model, sizes = {"chunks of 4, batch 4 then 8": (Chunks(4), (4, 8)), "chunks of 1": (Chunks(1), (4, 4)),
                    "uneven chunks": (Chunks(3), (5, 7)), "cell over time": (Cell(), (5, 5))}[case]
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.5)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(9)
    shape = (4, 6) if case == "cell over time" else (6,)
    batches = [(torch.randn(n, *shape, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]
    refs = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test", "grad_hist_1d"]):
        for x, y in batches:
            refs.append(_reference(model, x, y))
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    records = list(cockpit_lite.load(tmp_path / "run"))
    assert len(records) == len(batches)
    for rec, G, (x, _) in zip(records, refs, batches):
        assert rec["samples"] == x.shape[0]
        for name, Gp in G.items():
            assert rec["values"][f"norm_test/{name}"] == pytest.approx(_norm_test(Gp), rel=1e-4), (name, rec["step"])
        hist = rec["data"]["grad_hist_1d"]
        assert sum(hist["counts"]) == sum(Gp.numel() for Gp in G.values())  # every sample's every element


class PooledGRU(nn.Module):
    """A sequence-first GRU ([T, B, F]) pooled over time into a batch-first classifier output [B, classes]."""

    def __init__(self):
        super().__init__()
        self.rnn, self.head = nn.GRU(5, 6), nn.Linear(6, 3)

    def forward(self, x):
        o, _ = self.rnn(x)
        return self.head(o.mean(0))


@pytest.mark.parametrize("B", [5, 3])  # 3: as many samples as classes, so the output's dim 1 has B entries too
def test_sequence_first_inputs_pooled_into_a_batch_first_output(tmp_path, B):
    """Replayed along dim 1 (the GRU's batch), the [B, classes] output's loss could not be split: an internal error
    (torch.stack of unequal sizes) was the reason, naming no module. Now NaN with the reason, every step."""
    torch.manual_seed(0)
    model, crit = PooledGRU(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test", "loss"]):
        for _ in range(2):
            x, y = torch.randn(4, B, 5), torch.randint(0, 3, (B,))
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    for rec in run:
        assert rec["values"]["norm_test"] == "NaN"
        why = rec["reasons"]["norm_test"]
        assert "'rnn' (GRU, batch_first=False)" in why and "does not have the batch" in why, why
        assert math.isfinite(rec["values"]["loss"])


class Bags(nn.Module):
    def __init__(self, include_last_offset=False):
        super().__init__()
        self.bag = nn.EmbeddingBag(11, 6, mode="mean", include_last_offset=include_last_offset)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens, offsets):
        return self.head(torch.tanh(self.bag(tokens, offsets)))


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_on_packed_bags(tmp_path, include_last_offset):
    """EmbeddingBag on a 1-D index list with offsets: the fallback split the packed list as if it were rows
    (an error, or wrong sums that made every parameter NaN as 'not proportional to .grad'). Now its table is NaN
    naming it, and the head's values stay exact."""
    torch.manual_seed(0)
    model, crit = Bags(include_last_offset), nn.CrossEntropyLoss()
    lengths = [3, 1, 4, 2]
    tokens = torch.randint(0, 11, (sum(lengths),), generator=torch.Generator().manual_seed(4))
    starts = torch.tensor([0, 3, 4, 8])
    offsets = torch.cat([starts, torch.tensor([10])]) if include_last_offset else starts
    y = torch.tensor([0, 2, 1, 2])
    m64 = Bags(include_last_offset).double()
    m64.load_state_dict(model.state_dict())
    G = []
    for i, (a, n) in enumerate(zip(starts.tolist(), lengths)):  # bag i alone, through the head
        m64.zero_grad()
        off = torch.tensor([0, n] if include_last_offset else [0])
        nn.functional.cross_entropy(m64(tokens[a:a + n], off), y[i:i + 1]).backward()
        G.append(m64.head.weight.grad.reshape(-1).clone())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test"]):
        opt.zero_grad()
        crit(model(tokens, offsets), y).backward()
        opt.step()
    rec = next(iter(cockpit_lite.load(tmp_path / "run")))
    assert rec["values"]["norm_test/bag.weight"] == "NaN"
    assert "EmbeddingBag ('bag') is called on a 1-D index list" in rec["reasons"]["norm_test/bag.weight"]
    assert rec["values"]["norm_test/head.weight"] == pytest.approx(_norm_test(torch.stack(G)), rel=1e-4)


class CellFlat(nn.Module):
    """A cell looped over the T steps of [B, T, 6] inputs, its outputs flattened inside forward to [B * T, 3]."""

    def __init__(self, chunk=None):
        super().__init__()
        self.cell, self.head = nn.Linear(6 + 8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h, outs = x.new_zeros(x.shape[0], 8), []
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(torch.cat([x[:, t], h], 1)))
            outs.append(self.head(h))
        return torch.stack(outs, 1).reshape(-1, 3)


def test_cell_over_time_flattened_inside_forward_is_not_chunks(tmp_path):
    """The cell's T calls of B rows add up to the loss's B * T rows, but the model's input has B rows: time steps,
    not chunks of the batch. Per sequence (sample i's loss: B / N times the sum of its T token losses), exact."""
    torch.manual_seed(0)
    model, crit = CellFlat(), nn.CrossEntropyLoss()
    B, T = 5, 4
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(B, T, 6, generator=g), torch.randint(0, 3, (B * T,), generator=g)
    m64 = CellFlat().double()
    m64.load_state_dict(model.state_dict())
    G = []
    for i in range(B):
        m64.zero_grad()
        (nn.functional.cross_entropy(m64(x[i:i + 1].double()), y[i * T:(i + 1) * T], reduction="sum") / T).backward()
        G.append(torch.cat([p.grad.reshape(-1) for p in m64.parameters()]))
    G = torch.stack(G)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test"]):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    rec = next(iter(cockpit_lite.load(tmp_path / "run")))
    assert rec["values"]["norm_test"] == pytest.approx(_norm_test(G), rel=1e-4), rec.get("reasons")
