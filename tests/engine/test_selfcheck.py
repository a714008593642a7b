"""The per-sample self-check (cockpit_lite/engine/selfcheck.py): a layer rule that would give
silently wrong per-sample values (a module called without the batch dimension, with T == B) is caught
on the first step and its parameter reported NaN with the reason; correct models pass; a step that
cannot be replayed leaves the values standing, labelled unverified; training is not perturbed."""

import math

import numpy as np
import torch
from torch import nn

import cockpit_lite
from helpers import watched_training
from reference import flat, norm_test, per_sample_grads_bruteforce
from test_curvature import TupleOut

B = T = 6
V, D = 11, 8
NOISE = {"norm_test": "every", "grad_norm": "every"}


class PositionModel(nn.Module):
    """Token + learned position embeddings; ``batched`` says whether the positions carry the batch dim.
    ``scaled``: the table is multiplied by 1 before the addition, which hides from persample/broadcast.py that
    it is broadcast over the batch (only the self-check can then tell)."""

    def __init__(self, batched: bool, dropout: float = 0.0, scaled: bool = True):
        super().__init__()
        self.batched, self.scaled = batched, scaled
        self.tok, self.pos = nn.Embedding(V, D), nn.Embedding(T, D)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(D, V)

    def forward(self, x):
        positions = torch.arange(x.shape[1])
        if self.batched:
            positions = positions.expand(x.shape[0], -1)
        pos = self.pos(positions) * 1.0 if self.scaled else self.pos(positions)
        return self.head(self.drop(torch.tanh(self.tok(x) + pos))).reshape(-1, V)


def batches(steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B * T,), generator=g))
            for _ in range(steps)]


def train(model, data, logdir=None, quantities=None, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    crit = nn.CrossEntropyLoss(reduction="sum")
    return watched_training(model, opt, crit, data, logdir or None, quantities=quantities).run


def check_record(run):
    found = [(r["step"], r["data"]["persample_check"]) for r in run.records if "persample_check" in r.get("data", {})]
    assert len(found) == 1, "checked once, on the first per-sample step"
    return found[0]


def test_broadcast_position_embedding_with_T_equal_B_is_caught(tmp_path):
    torch.manual_seed(0)
    model = PositionModel(batched=False)
    run = train(model, batches(3), tmp_path, NOISE)
    step, check = check_record(run)
    assert step == 0 and check["status"] == "failed" and list(check["failed"]) == ["pos.weight"]
    assert check["replayed"] == ["pos.weight"]  # taken from the per-sample replay: no NaN, no warning
    assert "without the batch" in check["failed"]["pos.weight"]
    # the failed parameter is then taken from a per-sample replay of the model (persample/replayed.py):
    # right values, checked against brute force on the first step
    torch.manual_seed(0)
    ref_model = PositionModel(batched=False)
    x, y = batches(3)[0]
    ce = nn.CrossEntropyLoss(reduction="none")
    G = per_sample_grads_bruteforce(ref_model, lambda out, t: ce(out, t.reshape(-1)), x, y.view(B, T))
    assert math.isclose(run.series("norm_test")[1][0], norm_test(flat(G)), rel_tol=1e-4)
    assert np.isfinite(run.series("norm_test/pos.weight")[1]).all()


def test_a_table_added_directly_at_t_equal_b_goes_to_the_replay_before_the_check(tmp_path):
    """Added to the batch as it is, the table's rows are seen to be broadcast onto the batch's dim 1
    (persample/broadcast.mark_ambiguous): its parameter comes from the per-sample replay from the first step, so
    the check has nothing left to fail."""
    torch.manual_seed(0)
    run = train(PositionModel(batched=False, scaled=False), batches(2), tmp_path, NOISE)
    step, check = check_record(run)
    assert step == 0 and check["status"] == "passed"
    torch.manual_seed(0)
    ref_model = PositionModel(batched=False, scaled=False)
    x, _ = batches(2)[0]
    y = batches(2)[0][1]
    ce = nn.CrossEntropyLoss(reduction="none")
    G = per_sample_grads_bruteforce(ref_model, lambda out, t: ce(out, t.reshape(-1)), x, y.view(B, T))
    assert math.isclose(run.series("norm_test")[1][0], norm_test(flat(G)), rel_tol=1e-4)
    G_pos = per_sample_grads_bruteforce(ref_model, lambda out, t: ce(out, t.reshape(-1)), x, y.view(B, T),
                                        [ref_model.pos.weight])
    assert math.isclose(run.series("norm_test/pos.weight")[1][0], norm_test(flat(G_pos)), rel_tol=1e-4)


def test_other_parameters_of_a_failed_model_keep_right_values(tmp_path):
    """Only the failed parameter is dropped: the others equal the brute-force reference."""
    torch.manual_seed(0)
    model = PositionModel(batched=False)
    data = batches(1)
    x, y = data[0]
    ref_model = PositionModel(batched=False)
    ref_model.load_state_dict(model.state_dict())
    params = [ref_model.tok.weight, ref_model.head.weight, ref_model.head.bias]
    ce = nn.CrossEntropyLoss(reduction="none")
    G = per_sample_grads_bruteforce(ref_model, lambda out, t: ce(out, t.reshape(-1)), x, y.view(B, T), params)
    run = train(model, data, tmp_path, NOISE)
    for name, g in zip(["tok.weight", "head.weight", "head.bias"], G):
        got = run.series(f"norm_test/{name}")[1][0]
        assert math.isclose(got, norm_test(flat([g])), rel_tol=1e-4), name


def test_correct_models_pass(tmp_path):
    torch.manual_seed(0)
    run = train(PositionModel(batched=True), batches(3), tmp_path, NOISE)
    step, check = check_record(run)
    assert check["status"] == "passed" and check["parameters"] == 4
    assert np.isfinite(run.series("norm_test")[1]).all()


def test_check_waits_for_the_first_per_sample_step(tmp_path):
    torch.manual_seed(0)
    from cockpit_lite.schedules import Every

    run = train(PositionModel(batched=False), batches(7), tmp_path, {"norm_test": Every(5, offset=3), "grad_norm": "every"})
    step, check = check_record(run)
    assert step == 3 and check["status"] == "failed" and check["replayed"] == ["pos.weight"]


def test_unreplayable_step_is_labelled_unavailable_and_values_stand(tmp_path):
    torch.manual_seed(0)
    model = TupleOut(logits_first=False)  # returns (something else, logits); the loss gets the logits
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path, quantities=NOISE):
        for _ in range(2):
            x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
            opt.zero_grad()
            crit(model(x)[1], y).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path)
    _, check = check_record(run)
    # the re-evaluation reads a tuple's first tensor (a loss on it is replayed: round 4), not the second
    assert check["status"] == "unavailable" and "first tensor" in check["reason"]
    assert np.isfinite(run.series("norm_test")[1]).all()


def test_training_with_dropout_is_bitwise_identical_with_the_check(tmp_path):
    results = []
    for logdir in (None, tmp_path):
        torch.manual_seed(0)
        model = PositionModel(batched=True, dropout=0.3)
        torch.manual_seed(7)
        run = train(model, batches(3), logdir, NOISE)
        results.append([p.detach().clone() for p in model.parameters()])
    assert check_record(run)[1]["status"] == "passed"  # dropout replayed: same masks, same gradients
    for a, b in zip(*results):
        assert torch.equal(a, b)
