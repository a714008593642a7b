"""A layer whose output has as many rows as the batch but is broadcast onto another dim of it.

``pos(arange(T))`` returns [T, d], added to [B, T, d] token embeddings. While T != B the addition shows it
(broadcast.py reads its per-sample gradient there). When T == B nothing in the layer's own shapes does: the rule
read the positions as samples, and the sums over them are .grad, so neither the rules' sums nor any check of
them can tell. The first-sample self-check caught it where the step could be replayed; where it could not (a
loss on ``model(x) / 2``), norm_test/pos.weight logged 1.000 for 0.917. Now the addition is looked at whatever
T is: the table's parameters come from the per-sample replay, or are NaN with a reason naming the module.
A per-sample vector added with its rows on the batch's dim (``h + cond(c).unsqueeze(1)``) is left to its rule.
Reference: per-sample gradients by autograd, one sample at a time, in float64."""

import math

import pytest
import torch
from torch import nn

import cockpit_lite

V, D, C = 11, 8, 3


class PosLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(8, D), nn.Linear(D, V)

    def forward(self, idx):
        return self.head(torch.tanh(self.tok(idx) + self.pos(torch.arange(idx.shape[1]))))


class CondLM(nn.Module):
    """Batch-first, with a per-sample condition broadcast over the positions: its rows are the samples."""

    def __init__(self):
        super().__init__()
        self.tok, self.cond, self.head = nn.Embedding(V, D), nn.Embedding(C, D), nn.Linear(D, V)

    def forward(self, idx, c):
        return self.head(torch.tanh(self.tok(idx) + self.cond(c).unsqueeze(1)))


def _norm_tests(model, inputs, y, div):
    """{parameter: norm_test} (QUANTITIES.md) from per-sample gradients of the loop's loss; sample i's loss is its
    share B / N of the token-mean cross-entropy."""
    m = type(model)().double()
    m.load_state_dict(model.state_dict())
    B, N = y.shape[0], y.numel()
    G = {n: [] for n, _ in m.named_parameters()}
    for i in range(B):
        m.zero_grad()
        out = m(*[a[i:i + 1] for a in inputs]) / div
        (nn.functional.cross_entropy(out.reshape(-1, V), y[i].reshape(-1), reduction="sum") * B / N).backward()
        for n, p in m.named_parameters():
            G[n].append(p.grad.reshape(-1).clone())
    out = {}
    for n, gs in G.items():
        g = torch.stack(gs)
        mean = g.mean(0)
        out[n] = math.sqrt(((g ** 2).sum() / (mean @ mean) - B) / (B * (B - 1)))
    return out


def _run(model, batches, div, tmp_path):
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    refs = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test"]):
        for inputs, y in batches:
            refs.append(_norm_tests(model, inputs, y, div))
            opt.zero_grad()
            out = model(*inputs)
            crit((out / div if div != 1 else out).reshape(-1, V), y.reshape(-1)).backward()
            opt.step()
    return list(cockpit_lite.load(tmp_path / "run")), refs


def _batches(shapes, cond=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for s in shapes:
        x, y = torch.randint(0, V, s, generator=g), torch.randint(0, V, s, generator=g)
        out.append(((x, torch.randint(0, C, (s[0],), generator=g)) if cond else (x,), y))
    return out


@pytest.mark.parametrize("shapes", [[(4, 4)] * 3, [(4, 5), (4, 4), (4, 5)]], ids=["T == B", "T == B on step 1"])
def test_a_table_at_t_equal_b_without_a_replay_is_nan_naming_it(tmp_path, shapes):
    torch.manual_seed(0)
    recs, refs = _run(PosLM(), _batches(shapes), 2.0, tmp_path)
    for rec, ref, s in zip(recs, refs, shapes):
        v = rec["values"]
        for n in ("tok.weight", "head.weight", "head.bias"):
            assert v[f"norm_test/{n}"] == pytest.approx(ref[n], rel=1e-4), (rec["step"], n)
        if s[0] == s[1]:
            assert math.isnan(float(v["norm_test/pos.weight"])), (rec["step"], v["norm_test/pos.weight"])
            reason = rec["reasons"]["norm_test/pos.weight"]
            assert "'pos'" in reason and "positions" in reason, reason
        else:  # read at the addition (broadcast.py): exact
            assert v["norm_test/pos.weight"] == pytest.approx(ref["pos.weight"], rel=1e-4)


def test_a_table_at_t_equal_b_with_a_replay_is_exact(tmp_path):
    torch.manual_seed(0)
    recs, refs = _run(PosLM(), _batches([(4, 4)] * 3), 1, tmp_path)
    for rec, ref in zip(recs, refs):
        for n, r in ref.items():
            assert rec["values"][f"norm_test/{n}"] == pytest.approx(r, rel=1e-4), (rec["step"], n)


def test_a_per_sample_vector_broadcast_over_positions_keeps_its_rule(tmp_path):
    """[B, d] -> unsqueeze(1) -> + [B, T, d]: its rows stay on the batch's dim; no replay is needed, so the values
    are there even with a loss that cannot be replayed."""
    torch.manual_seed(0)
    recs, refs = _run(CondLM(), _batches([(4, 4)] * 2, cond=True), 2.0, tmp_path)
    for rec, ref in zip(recs, refs):
        for n, r in ref.items():
            assert rec["values"][f"norm_test/{n}"] == pytest.approx(r, rel=1e-4), (rec["step"], n)
