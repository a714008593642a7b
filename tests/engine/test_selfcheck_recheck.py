"""The self-check looks again at a parameter whose layer rule serves it differently from the checked step.

A position table called on ``arange(T)`` and added to a [B, T, d] batch is read at the addition while T != B
(persample/broadcast.py). On a later step where T == B (dynamic padding, a last batch of another size) nothing
in the shapes shows that its rows are positions, and the rule read them as samples: finite, wrong values
(norm_test/pos.weight 1.000 for 1.106). Likewise a table frozen on the checked step and trained later was never
checked. Reference: per-sample gradients by autograd, one sample at a time, in float64."""

import math

import pytest
import torch
from torch import nn

import cockpit_lite

V, D = 11, 8


class PosLM(nn.Module):
    """``scaled``: the table times 1 before the addition, which hides from persample/broadcast.py that it is
    broadcast (added as it is, at T == B the table goes to the per-sample replay without a check)."""

    scaled = True

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(V, D), nn.Embedding(8, D), nn.Linear(D, V)

    def forward(self, idx):
        pos = self.pos(torch.arange(idx.shape[1]))
        return self.head(torch.tanh(self.tok(idx) + (pos * 1.0 if self.scaled else pos)))


def _norm_test(model, x, y) -> float:
    """norm_test of pos.weight (QUANTITIES.md) from per-sample gradients; sample i's loss is its share B / N of
    the batch's token-mean cross-entropy."""
    m = PosLM().double()
    m.load_state_dict(model.state_dict())
    B, N, G = x.shape[0], y.numel(), []
    for i in range(B):
        m.zero_grad()
        (nn.functional.cross_entropy(m(x[i:i + 1]).reshape(-1, V), y[i].reshape(-1), reduction="sum") * B / N).backward()
        G.append(m.pos.weight.grad.reshape(-1).clone())
    G = torch.stack(G)
    g = G.mean(0)
    return math.sqrt(((G ** 2).sum() / (g @ g) - B) / (B * (B - 1)))


@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "added as it is"])
@pytest.mark.parametrize("mode", ["varlen", "lastbatch", "unfreeze", "every step T == B"])
def test_a_rule_serving_a_parameter_otherwise_is_checked_again(tmp_path, mode, scaled, monkeypatch):
    shapes = {"varlen": [(4, 5), (4, 4), (4, 4)], "lastbatch": [(4, 5), (5, 5), (4, 5)],
              "unfreeze": [(4, 4), (4, 4), (4, 4)], "every step T == B": [(4, 4), (4, 4), (4, 4)]}[mode]
    monkeypatch.setattr(PosLM, "scaled", scaled)
    torch.manual_seed(0)
    model, crit = PosLM(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, V, s, generator=g), torch.randint(0, V, s, generator=g)) for s in shapes]
    refs = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=["norm_test"]):
        for t, (x, y) in enumerate(batches):
            trained = not (mode == "unfreeze" and t == 0)
            model.pos.weight.requires_grad_(trained)
            refs.append(_norm_test(model, x, y) if trained else math.nan)
            opt.zero_grad()
            crit(model(x).view(-1, V), y.view(-1)).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    steps, values = run.series("norm_test/pos.weight")
    assert len(steps) == len(batches)
    for step, value, ref in zip(steps, values, refs):
        if math.isnan(ref):
            assert math.isnan(value)
        else:
            assert value == pytest.approx(ref, rel=1e-4), (int(step), value, ref)
    checks = [r["data"]["persample_check"] for r in run if "persample_check" in r.get("data", {})]
    # one check on the first step, one more where the table is first read by its rows; none after that. Added as
    # it is, the table at T == B is never read by its rows (persample/broadcast.mark_ambiguous): one check
    assert len(checks) == (1 if mode == "every step T == B" or not scaled else 2), checks
