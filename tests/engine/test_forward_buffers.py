"""``forward_buffers.ForwardBuffers``: a re-evaluation starts from the buffers as the step's forward found them, and
only the buffers some forward changes are copied after the first forward (a large buffer the forward only reads is
copied once, not on every tracked step)."""

import torch
from torch import nn

from cockpit_lite.forward_buffers import ForwardBuffers, start_values


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(64, 8))  # read only
        self.register_buffer("count", torch.zeros(()))  # advanced by every forward, before it is read
        self.lin = nn.Linear(8, 2)

    def forward(self, idx):
        self.count += 1
        return self.lin(self.table[idx] * self.count)


def test_copies_only_what_forwards_change_after_the_first():
    model, watch = _Model(), ForwardBuffers()
    snap = watch.before(model)
    assert all(copy is not None for _, _, copy in snap)  # nothing learned yet: every buffer
    model(torch.tensor([1, 2]))
    before = watch.after(snap)
    assert set(before) == {id(model.count)} and float(before[id(model.count)]) == 0.0
    snap = watch.before(model)
    copies = {id(b): copy for b, _, copy in snap}
    assert copies[id(model.table)] is None and float(copies[id(model.count)]) == 1.0
    model(torch.tensor([3]))
    before = watch.after(snap)
    starts = start_values([model.table, model.count], before)
    assert starts[id(model.table)] is model.table and float(starts[id(model.count)]) == 1.0
    assert float(model.count) == 2.0


def test_a_buffer_changed_for_the_first_time_later_is_copied_from_then_on():
    model, watch = _Model(), ForwardBuffers()
    watch.after(watch.before(model))  # a forward that changed nothing
    snap = watch.before(model)
    model(torch.tensor([0]))
    assert watch.after(snap) == {}  # not copied this time: not restored on this step
    snap = watch.before(model)
    assert {id(b) for b, _, copy in snap if copy is not None} == {id(model.count)}


def test_an_eval_mode_forward_first_teaches_nothing():
    model, watch = _Model(), ForwardBuffers()
    model.eval()
    snap = watch.before(model)
    watch.after(snap)  # (this toy model changes its buffer in eval mode too; BatchNorm and spectral_norm do not)
    model.train()
    snap = watch.before(model)
    assert all(copy is not None for _, _, copy in snap)  # still copies every buffer
