"""Reshapes between model output and loss (issue 19 item 2): logits.view(-1, V), reshape, flatten,
transpose, the flattening inside a loss module, ignore_index padding, sum reduction. Samples are the B
sequences; l_i is sequence i's share of the loss; curvature replays the same view. References: a loop
over single sequences in float64 (tests/real_models.py) and dense Hessians (tests/curvature_reference.py).
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite.quantities.ggn_trace import GGNTrace
from cockpit_lite.quantities.hess_max_ev import HessMaxEV
from cockpit_lite.quantities.hess_trace import HessTrace

from curvature_reference import ggn, hessian
from helpers import Probe
from real_models import FlattenInLoss, T, V, Case, lm_tokens, reference_losses_and_grads

D = 6


class TinyLM(nn.Module):
    """Token embedding, a per-position mixing layer, a head: no parameter outside the batch."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        h = self.emb(idx)
        h = torch.tanh(self.mix(h)) + h.cumsum(1) / 3  # positions interact within a sequence
        return self.head(h)


LAYOUTS = {
    "view": lambda o, y: (o.view(-1, V), y.view(-1)),
    "reshape": lambda o, y: (o.reshape(-1, V), y.reshape(-1)),
    "flatten": lambda o, y: (o.flatten(0, 1), y.flatten()),
    "transpose": lambda o, y: (o.transpose(1, 2), y),
    "last_position": lambda o, y: (o[:, -1], y[:, -1].clamp(min=0)),
}


def make_case(layout, reduction="mean", pad=True, loss=None, B=4):
    torch.manual_seed(0)
    x, y = lm_tokens(B, pad=pad)
    fn = loss or nn.CrossEntropyLoss(ignore_index=-100, reduction=reduction)
    return Case(layout, TinyLM(), fn, x, y, LAYOUTS.get(layout, lambda o, y: (o, y)))


def run_probe(case, tmp_path, extra=()):
    probe = Probe()
    before = copy.deepcopy(case.model)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.0)
    cp = cockpit_lite.watch(case.model, opt, loss_fn=case.loss_fn, logdir=tmp_path / "run",
                            quantities=[probe, *extra])
    opt.zero_grad()
    case.loss().backward()
    opt.step()
    cp.close()
    return probe, before, cockpit_lite.load(tmp_path / "run")


def check(probe, case, before):
    l_ref, g_ref, names = reference_losses_and_grads(case, before)
    assert probe.unsupported == {} and probe.losses_reason is None
    assert probe.n == case.B
    torch.testing.assert_close(probe.losses.double(), l_ref, rtol=1e-4, atol=1e-6)
    for G, R in zip(probe.G, g_ref):
        torch.testing.assert_close(G.double(), R, rtol=1e-4, atol=1e-6 * float(R.abs().max()))
    sq = sum(R.reshape(case.B, -1).pow(2).sum(1) for R in g_ref)
    torch.testing.assert_close(probe.sq_total.double(), sq, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_losses_and_gradients_through_the_view(tmp_path, layout, reduction):
    case = make_case(layout, reduction)
    probe, before, run = run_probe(case, tmp_path)
    check(probe, case, before)
    assert run.records[0]["samples"] == case.B  # B sequences, not B*T tokens


def test_flattening_inside_a_loss_module(tmp_path):
    case = make_case("module", loss=FlattenInLoss())
    probe, before, run = run_probe(case, tmp_path)
    check(probe, case, before)
    assert run.records[0]["samples"] == case.B


def test_unpadded_mse_on_flattened_outputs(tmp_path):
    torch.manual_seed(1)
    x, _ = lm_tokens(3, pad=False)
    y = torch.randn(3, T, V)
    case = Case("mse", TinyLM(), nn.MSELoss(), x, y, lambda o, y: (o.reshape(-1, V), y.reshape(-1, V)))
    probe, before, _ = run_probe(case, tmp_path)
    check(probe, case, before)


def test_copy_in_another_layout_is_nan_with_reason(tmp_path):
    """Sequence-major rows made by a copy: grouping consecutive rows would mix sequences; refused."""
    case = make_case("copy")
    case.loss_input = lambda o, y: (o.transpose(0, 1).reshape(-1, V), y.t().reshape(-1))
    probe, _, run = run_probe(case, tmp_path, extra=[HessTrace("every")])
    assert probe.losses_reason is not None and "copy of the model output" in probe.losses_reason
    assert torch.isnan(probe.losses).all()
    assert "copy of the model output" in run.reasons("hess_trace")[0]


def _dense(case, before, B=None):
    theta = dict(before.named_parameters())
    fn = copy.copy(case.loss_fn)
    x, y = (case.x, case.y) if B is None else (case.x[:B], case.y[:B])
    return hessian(before, lambda out, yy: fn(*case.loss_input(out, yy)), x, y, theta)


@pytest.mark.parametrize("layout", ["view", "transpose", "module"])
def test_curvature_replays_the_view(tmp_path, layout):
    case = make_case(layout, loss=FlattenInLoss() if layout == "module" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, before, run = run_probe(case, tmp_path, extra=[HessMaxEV("every", tol=1e-6, max_iter=200),
                                                          HessTrace("every"), GGNTrace("every")])
    H = _dense(case, before)
    top = float(torch.linalg.eigvalsh(H)[-1])
    assert run.series("hess_max_ev")[1][0] == pytest.approx(top, rel=1e-4)
    theta = dict(before.named_parameters())
    fn = copy.copy(case.loss_fn)
    Gm = ggn(before, lambda out, yy: fn(*case.loss_input(out, yy)), case.x, case.y, theta)
    for key, exact in (("hess_trace", float(torch.trace(H))), ("ggn_trace", float(torch.trace(Gm)))):
        value, se = run.series(key)[1][0], run.series(f"{key}/stderr")[1][0]
        if se == 0:
            assert value == pytest.approx(exact, rel=1e-4)
        else:
            assert abs(value - exact) <= 4 * se


def test_curvature_sub_batch_takes_the_first_sequences(tmp_path):
    case = make_case("view")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, before, run = run_probe(case, tmp_path, extra=[HessMaxEV("every", tol=1e-6, max_iter=200, subbatch=2)])
    top = float(torch.linalg.eigvalsh(_dense(case, before, B=2))[-1])
    assert run.series("hess_max_ev")[1][0] == pytest.approx(top, rel=1e-4)


def test_backpack_is_not_used_through_a_view(tmp_path):
    """An nn.Sequential BackPACK supports, its [B, T, V] output flattened for the loss: the exact diagonals
    would see the output itself; the trace is the HVP estimate with its error, near the dense trace."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(4, T, 4), torch.randint(0, 3, (4, T))
    case = Case("seq", model, nn.CrossEntropyLoss(), x, y, lambda o, y: (o.reshape(-1, 3), y.reshape(-1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, before, run = run_probe(case, tmp_path, extra=[HessTrace("every", probes=50)])
    info = run.data("hess_trace")[0][1]
    assert "view" in info.get("exact_unavailable", ""), info
    exact = float(torch.trace(_dense(case, before)))
    value, se = run.series("hess_trace")[1][0], run.series("hess_trace/stderr")[1][0]
    assert se > 0 and abs(value - exact) <= 4 * se
