"""A loss module with ``reduction="none"`` whose elements the loop combines itself (engine/loss_elements.py).

Equal weights as a mean (``.mean()``, token-level LM losses averaged, accumulation): every value is the
float64 brute force's, as for a mean-reduced loss module; equal weights of a sum: the per-sample quantities
(free of the scale) are, the loss and curvature (whose scale is unknown) are NaN with the reason. A masked mean or the k hardest samples: the logged
loss is the mean of the elements that count; what re-evaluates loss_fn (curvature) or needs per-sample
losses is NaN with the reason. Per-sample weights, a focal transform: no logged value may be the mean of the
elements presented as the loss; everything that depends on it is NaN with the reason.

The reference: g_i = B * grad of the loop's own loss (a sum's: 1 * grad) with every other sample's model output detached
(float64), whatever the combination; the loss is the loop's loss; the Hessian is that of the loop's loss.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import cockpit_lite
from cockpit_lite.engine import loss_elements

import reference as R

B, T, V = 6, 3, 5
NOISE = ("norm_test", "inner_test", "ortho_test", "mean_gsnr")


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 4))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb, self.mix, self.head = nn.Embedding(V, 6), nn.Linear(6, 6), nn.Linear(6, V)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.emb(idx))))


def _mlp_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 8, generator=g), torch.randint(0, 4, (B,), generator=g)


def _lm_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)


W = torch.linspace(0.5, 1.5, B)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.float32)


def _focal(l):
    return ((1 - torch.exp(-l)) ** 2 * l).mean()


# name: (model builder, batch, combine(elements of loss_fn(out, y), micro-batch factor) -> the loop's loss,
#        loss input from the output, expected: "exact" / "masked" / "weighted")
CASES = {
    "mean": (mlp, _mlp_batch, lambda l: l.mean(), lambda o: o, "exact"),
    "sum": (mlp, _mlp_batch, lambda l: l.sum(), lambda o: o, "exact"),
    "lm_tokens_mean": (TinyLM, _lm_batch, lambda l: l.mean(), lambda o: o.view(-1, V), "exact"),
    "lm_tokens_2d": (TinyLM, _lm_batch, lambda l: l.mean(), lambda o: o.transpose(1, 2), "exact"),
    "lm_masked_mean": (TinyLM, _lm_batch, lambda l: (l * MASK.view(-1)).sum() / MASK.sum(), lambda o: o.view(-1, V),
                       "masked"),
    "top_k": (mlp, _mlp_batch, lambda l: l.topk(3).values.mean(), lambda o: o, "masked"),
    "sample_weights": (mlp, _mlp_batch, lambda l: (l * W).mean(), lambda o: o, "weighted"),
    "focal": (mlp, _mlp_batch, _focal, lambda o: o, "weighted"),
}


def _target(out_view, y):
    return y.reshape(-1) if out_view.dim() == 2 and y.dim() > 1 else y


def _reference(case, model, x, y):
    """(loop's loss, [B, P] per-sample gradients, dense Hessian) in float64."""
    _, _, combine, view, _ = CASES[case]
    crit = nn.CrossEntropyLoss(reduction="none")
    m = copy.deepcopy(model).double()
    xd = x.double() if x.is_floating_point() else x
    params = list(m.parameters())

    def loss_of(out):
        v = view(out)
        return combine(crit(v, _target(v, y)))

    full = m(xd).detach()
    rows = []
    for i in range(B):
        out = torch.cat([full[:i], m(xd[i:i + 1]), full[i + 1:]])
        # l_i on the scale of the elements' mean (what the logged loss averages): a sum's g_i has no factor B
        c = 1 if case == "sum" else B
        rows.append(torch.cat([c * g.reshape(-1) for g in torch.autograd.grad(loss_of(out), params)]))
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for p in params]
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def f(theta):
        ps, at = {}, 0
        for n, s in zip(names, shapes):
            ps[n] = theta[at:at + math.prod(s)].view(s)
            at += math.prod(s)
        return loss_of(functional_call(m, ps, (xd,)))

    H = torch.autograd.functional.hessian(f, flat)
    return float(loss_of(full)), torch.stack(rows), H


def _run(case, tmp_path, micro=1):
    build, batch, combine, view, _ = CASES[case]
    model, (x, y) = build(), batch()
    before = copy.deepcopy(model)
    crit = nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    qs = {q: "every" for q in ("loss", "hess_trace", *NOISE)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=qs):
            opt.zero_grad()
            for k in range(micro):  # micro-batches of equal size, each loss divided by their count
                xs, ys = x[k::micro], y[k::micro]
                v = view(model(xs))
                (combine(crit(v, _target(v, ys))) / micro).backward()
            opt.step()
    (rec,) = [r for r in cockpit_lite.load(tmp_path / "run").records if not r.get("amends")]
    return before, x, y, rec


def _value(rec, key):
    v = rec["values"].get(key)
    return math.nan if v is None else float(v)


@pytest.mark.parametrize("case", sorted(CASES))
def test_elements_combined_by_the_loop(tmp_path, case):
    expected = CASES[case][-1]
    before, x, y, rec = _run(case, tmp_path)
    loss, G, H = _reference(case, before, x, y)
    reasons = rec.get("reasons", {})
    assert rec["samples"] == B
    if expected == "weighted":
        for key in ("loss", "hess_trace", *NOISE):
            assert math.isnan(_value(rec, key)) and "unequal weights" in reasons[key], key
        return
    if case == "sum":  # equal weights of 1 (a sum, or a scaled mean): the scale is unknown, the tests are free of it
        for key in ("loss", "hess_trace"):
            assert math.isnan(_value(rec, key)) and "scale of the loss" in reasons[key], key
        for q in NOISE:
            assert _value(rec, q) == pytest.approx(getattr(R, q)(G), rel=1e-4, abs=1e-7), q
        return
    # the mean over the elements that count is the loop's loss
    assert _value(rec, "loss") == pytest.approx(loss, rel=1e-5), reasons.get("loss")
    if expected == "masked":
        for key in ("hess_trace", *NOISE):
            assert math.isnan(_value(rec, key)) and "leaves some of them out" in reasons[key], key
        return
    refs = {q: getattr(R, q)(G) for q in NOISE}
    for q, ref in refs.items():
        assert _value(rec, q) == pytest.approx(ref, rel=1e-4, abs=1e-7), q
    _check_trace(rec, torch.trace(H).item())


def _check_trace(rec, trace):
    """Exact (BackPACK, nn.Sequential) to 1e-4, or a Hutchinson estimate within 4 of its standard errors."""
    if rec["data"]["hess_trace"]["method"].startswith("exact"):
        assert _value(rec, "hess_trace") == pytest.approx(trace, rel=1e-4)
    else:
        assert abs(_value(rec, "hess_trace") - trace) <= 4 * _value(rec, "hess_trace/stderr")


def test_accumulated_micro_batches_of_element_losses(tmp_path):
    before, x, y, rec = _run("mean", tmp_path, micro=2)
    # the step's loss: the two halves' means, each divided by 2 (equal halves: the mean over the batch)
    order = torch.cat([torch.arange(0, B, 2), torch.arange(1, B, 2)])
    loss, G, H = _reference("mean", before, x[order], y[order])
    assert _value(rec, "loss") == pytest.approx(loss, rel=1e-5)
    for q in NOISE:
        assert _value(rec, q) == pytest.approx(getattr(R, q)(G), rel=1e-4, abs=1e-7), q
    _check_trace(rec, torch.trace(H).item())


@pytest.mark.parametrize("grad, kind", [
    (torch.full((4,), 0.25), "equal"),
    (torch.tensor([0.5, 0.0, 0.5, 0.0]), "masked"),
    (torch.tensor([0.1, 0.2, 0.3, 0.4]), "weighted"),
    (torch.zeros(4), "equal"),
])
def test_weights_are_classified_from_the_gradient_reaching_the_elements(grad, kind):
    elements = torch.tensor([1.0, 2.0, 3.0, 4.0])
    loss, why, scale = loss_elements.combined(elements, grad)
    if kind == "equal":
        assert why is None and float(loss) == 2.5 and float(scale) == pytest.approx(float(grad[0]) * 4)
    elif kind == "masked":
        assert why == loss_elements.MASKED and float(loss) == 2.0
    else:
        assert why == loss_elements.WEIGHTED and math.isnan(float(loss))
