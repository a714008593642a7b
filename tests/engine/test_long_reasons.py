"""A reason quoting a whole torch error (6,000 characters for a checkpointed model's failed replay, once per key and
step) is logged with its middle cut at ``records.MAX_REASON`` characters: the start says what failed, the end the
last cause; a 100,000-step run's log stays its size."""

import torch
from torch import nn

import cockpit_lite
from cockpit_lite.engine.records import MAX_REASON, capped
from cockpit_lite.quantities import REGISTRY
from cockpit_lite.quantities.base import Quantity

LONG = "the per-sample replay failed: RuntimeError: " + "x" * 6000 + " (and 15 more parameter(s))"


class _LongReason(Quantity):
    name = "long_reason"

    def before_step(self, ctx):
        ctx.emit_nan(self.name, LONG)


def test_capped_keeps_both_ends():
    assert capped("short") == "short" and capped(None) is None
    out = capped(LONG)
    assert len(out) <= MAX_REASON + 40 and out.startswith("the per-sample replay failed: RuntimeError: ")
    assert out.endswith(" (and 15 more parameter(s))") and f"{len(LONG) - MAX_REASON * 2 // 3 - MAX_REASON // 4} characters cut" in out


def test_a_long_reason_is_logged_cut(tmp_path, monkeypatch):
    monkeypatch.setitem(REGISTRY, "long_reason", _LongReason)
    model, crit = nn.Linear(3, 2), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path, quantities=["loss", "long_reason"]):
        for _ in range(2):
            opt.zero_grad()
            crit(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path)
    reasons = run.reasons("long_reason")
    assert sorted(reasons) == [0, 1] and all(r == capped(LONG) for r in reasons.values())
