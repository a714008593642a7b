"""Models the tests had not seen (issue 19 probe, tests/unseen_models.py): every logged gradient-noise value
(norm/inner/ortho tests, mean_gsnr, early_stopping, total and per parameter) and the loss equal a float64
brute force within 1e-4 relative, or are NaN with a reason naming the module. The loop is written the way
users write it: ``loss = crit(model(x).view(-1, V), y.view(-1))``, the model output not kept."""

import copy
import math
import warnings

import pytest
import torch

import cockpit_lite

import reference as R
from unseen_models import cases as unseen_cases, reference
from unseen_more_models import (argument_cases, coincidence_cases, layer_cases, lm_cases, more_cases, sparse_cases,
                                training_cases)



def cases():
    out = {**unseen_cases(), **lm_cases(), **coincidence_cases(), **more_cases(), **training_cases(), **layer_cases(),
           **argument_cases(), **sparse_cases()}
    out.pop("batch_centered")  # samples mix: no single-sample reference (its own test below)
    return out


QS = {"norm_test": R.norm_test, "inner_test": R.inner_test, "ortho_test": R.ortho_test,
      "mean_gsnr": R.mean_gsnr, "early_stopping": R.early_stopping}

# case -> the module whose parameters are NaN with a reason naming it (exact is not reached there)
NAN_WITH_REASON = {
    "embedding_bag_offsets": "'bag'",  # EmbeddingBag(tokens, offsets): the per-sample fallback cannot split
    # (embedding_max_norm: Embedding(max_norm) renormalises its weight in forward, which vmap cannot trace: was NaN
    # naming 'emb'; now the per-sample replay's loop serves it, checked against the step's per-sample losses: exact)
    # (chunked_forward: the batch in two chunks; its calls' rows add up to the loss's samples, so every parameter
    # comes from the per-sample replay: exact, was NaN since the self-check found the rows are not samples)
    # (packed_lstm: an LSTM on a PackedSequence has no rule; since the per-sample replay splits the tensors of a dict
    # input, its one-sample-at-a-time loop serves it: exact, was NaN "no module call")
    # (prompt_3/prompt_4: output[:, P:] reshaped inline, a copy, has no replay; their position table 'pos' is
    # exact since its per-sample gradients are read at the addition that broadcasts it: persample/broadcast.py)
    # logits / 2 before the loss: nothing replays the step; the tied wte.weight fails the check of the rules'
    # mean against .grad (selfcheck._sum_check), wpe (arange(T)) has no replay
    "temperature_gpt_biased_tie": "F.linear",
}
# a copy made inline, UnsafeView(Clone(output[:, P:])): its rows (B*T) are counted (known limit)


def run_case(u, tmp_path, quantities=None):
    """One watched step of case ``u`` (its micro-batches, each loss times its factor): (the model before
    the step, the step record). ``quantities``: every quantity of the comparison unless given."""
    before = copy.deepcopy(u.model)
    opt = torch.optim.SGD(u.model.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(u.model, opt, loss_fn=u.loss_fn, logdir=tmp_path / "run",
                                quantities=quantities or {q: "every" for q in ["loss", *QS]}):
            opt.zero_grad()
            for x, y, c in u.micro:
                (c * u.loss_fn(*u.loss_input(u.call(u.model, x), y))).backward()
            opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    (rec,) = [r for r in run.records if not r.get("amends")]
    return before, rec


def compare(u, before, rec):
    """(wrong: [(key, logged, reference)], nan: {key: reason or None})."""
    loss, G, names = reference(u, before)
    vals, reasons = rec["values"], rec.get("reasons", {})
    wrong, nan = [], {}

    def check(key, ref):
        v = vals.get(key)
        v = float(v) if v is not None else math.nan
        # early_stopping = 1 - B mean_j(...): its O(1) terms cancel near 0, float32 leaves ~1e-5 absolute
        abs_tol = 1e-4 if key.startswith("early_stopping") else 1e-7
        if math.isnan(v):
            nan[key] = reasons.get(key)
        elif not math.isclose(v, ref, rel_tol=1e-4, abs_tol=abs_tol):
            wrong.append((key, v, ref))

    check("loss", loss)
    for q, f in QS.items():
        check(q, f(R.flat(G)))
        for n, g in zip(names, G):
            check(f"{q}/{n}", f(R.flat([g])))
    return wrong, nan


@pytest.mark.parametrize("name", sorted(cases()))
def test_logged_values_equal_brute_force_or_nan_with_reason(tmp_path, name):
    u = cases()[name]()
    before, rec = run_case(u, tmp_path)
    wrong, nan = compare(u, before, rec)
    assert wrong == [], wrong
    assert all(nan.values()), [k for k, r in nan.items() if not r]  # every NaN carries a reason
    nan = {k: r for k, r in nan.items() if "frozen" not in r}  # a frozen parameter has no gradient
    module = NAN_WITH_REASON.get(name)
    if module is None:
        assert nan == {}, nan
    else:
        assert nan and any(module in r for r in nan.values()), nan
        assert "loss" not in nan


@pytest.mark.parametrize("name", sorted(cases()))
def test_samples_is_the_batch(tmp_path, name):
    """B sequences, never B*T positions, also when the loop does not keep the model output in a variable."""
    u = cases()[name]()
    _, rec = run_case(u, tmp_path)
    assert rec.get("samples") == u.B


def test_inline_view_recovered_from_the_autograd_node():
    """crit(model(x).view(-1, V), ...): the engine's weak reference to the output died before the loss call
    (a biased Linear's [B, T, V] output is itself a view of [B*T, V]); the view is read from the loss input's
    ViewBackward0 node instead."""
    from cockpit_lite.persample.output_view import observe

    class MB:
        batch_size = 20

    lin = torch.nn.Linear(3, 11)
    mb = MB()
    observe(mb, None, lin(torch.randn(4, 5, 3)).view(-1, 11))
    assert mb.batch_size == 4 and mb.view.kind == "reshape" and mb.view.out_shape == (4, 5, 11)
    mb = MB()
    observe(mb, None, torch.log_softmax(lin(torch.randn(4, 5, 3)), -1).transpose(1, 2))  # not a reshape: left alone
    assert mb.batch_size == 20 and mb.view is None


@pytest.mark.parametrize("model", ["tiny_lm", "sequential"])
def test_curvature_with_an_inline_flattened_loss_against_a_dense_hessian(tmp_path, model):
    """crit(model(x).view(-1, V), y.view(-1)), padding ignored: hess_max_ev within 1e-3 of the dense float64
    Hessian's top eigenvalue, hess_trace exact (BackPACK, nn.Sequential) or an estimate with its error."""
    from torch import nn
    from torch.nn import functional as F

    from curvature_reference import hessian
    from unseen_models import V, TinyLM, tokens

    torch.manual_seed(0)
    x, y = tokens(4)
    if model == "tiny_lm":
        m = TinyLM()
    else:  # dense inputs [B, T, 6]: BackPACK's exact diagonal where it is exact
        m, x = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, V)), torch.randn(4, 5, 6)
    crit = nn.CrossEntropyLoss(ignore_index=-100)
    theta = {n: p.detach().clone() for n, p in m.named_parameters()}
    H = hessian(m, lambda o, t: F.cross_entropy(o.reshape(-1, V), t.reshape(-1), ignore_index=-100), x, y, theta)
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(m, opt, loss_fn=crit, logdir=tmp_path / "run",
                                quantities={"hess_trace": "every", "hess_max_ev": "every"}):
            opt.zero_grad()
            crit(m(x).view(-1, V), y.view(-1)).backward()
            opt.step()
    rec = cockpit_lite.load(tmp_path / "run").records[0]
    assert rec.get("reasons", {}) == {}, rec.get("reasons")
    assert rec["values"]["hess_max_ev"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)
    method = rec["data"]["hess_trace"]["method"]
    if method.startswith("exact"):
        assert rec["values"]["hess_trace"] == pytest.approx(float(H.trace()), rel=1e-4)
    else:
        assert float(rec["values"]["hess_trace/stderr"]) > 0


@pytest.mark.parametrize("B", [4, 64])
def test_samples_mixed_by_a_batch_statistic_are_nan_before_it_and_exact_after(tmp_path, B):
    """h - h.mean(0) in forward (no BatchNorm module to recognise): the layer before it has no per-sample
    gradient of its own (NaN with the reason; the first-sample check finds it, off by 0.07 at B=64); the layer
    after it is exact: l_i depends on it through row i only (autograd on the whole batch, float64)."""
    from torch.nn import functional as F

    from unseen_models import Unseen, labels
    from unseen_more_models import BatchCentered

    g = torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    x, y = torch.randn(B, 5, generator=g), labels(B)
    u = Unseen("batch_centered", BatchCentered(), torch.nn.CrossEntropyLoss(), [(x, y, 1.0)])
    before, rec = run_case(u, tmp_path)
    m = copy.deepcopy(before).double()
    losses = F.cross_entropy(m(x.double()), y, reduction="none")
    G = [torch.stack([torch.autograd.grad(losses[i], p, retain_graph=True)[0] for i in range(B)])
         for p in (m.b.weight, m.b.bias)]
    vals, reasons = rec["values"], rec.get("reasons", {})
    for q, f in QS.items():
        for n in ("a.weight", "a.bias"):
            assert math.isnan(float(vals[f"{q}/{n}"])) and "mix" in reasons[f"{q}/{n}"], (q, n)
        assert math.isnan(float(vals[q])) and reasons[q]
        for n, Gj in zip(("b.weight", "b.bias"), G):
            assert float(vals[f"{q}/{n}"]) == pytest.approx(f(R.flat([Gj])), rel=1e-4, abs=1e-7), (q, n)


def reference_alpha(u, m0, m1) -> float:
    """alpha from QUANTITIES.md on float64 brute force at theta_t (m0) and theta_{t+1} (m1), same batch."""
    import numpy as np

    from unseen_models import reference_losses

    d = torch.cat([(b.detach() - a.detach()).double().reshape(-1) for a, b in zip(m0.parameters(), m1.parameters())])
    t = float(d.norm())
    obs = []
    for m in (m0, m1):
        losses, G, _ = reference_losses(u, m), *reference(u, m)[1:]
        p = R.flat(G) @ (d / t)
        obs.append((float(losses.mean()), float(losses.var()), float(p.mean()), float(p.var())))
    (f0, vf0, df0, vd0), (f1, vf1, df1, vd1) = obs
    Phi = np.array([[1, 0, 0], [1, t, t * t], [0, 1, 0], [0, 1, 2 * t]], dtype=np.float64)
    w = np.sqrt(1.0 / np.where(np.array([vf0, vf1, vd0, vd1]) == 0, 1e-10, [vf0, vf1, vd0, vd1]))
    w0, w1, w2 = np.linalg.lstsq(Phi * w[:, None], np.array([f0, f1, df0, df1]) * w, rcond=None)[0]
    return -1.0 if w2 <= 0 else 2 * t / (-w1 / w2) - 1


@pytest.mark.parametrize("name", ["vit", "padded_encoder", "class_weights_smoothing", "inline_gpt_biased_tie", "two_views",
                                  "checkpoint_reentrant", "kwargs_dict", "bce_multilabel_pos_weight", "rel_bias_embedding"])
def test_alpha_against_brute_force(tmp_path, name):
    """Two SGD steps on the same batch; alpha within 1e-3 of the float64 fit of QUANTITIES.md."""
    u = cases()[name]()
    opt = torch.optim.SGD(u.model.parameters(), lr=0.3)
    snaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(u.model, opt, loss_fn=u.loss_fn, logdir=tmp_path / "run", quantities={"alpha": "every"}):
            for _ in range(2):
                fresh = cases()[name]().model  # the watched model holds hooks: a copy by its state
                fresh.load_state_dict(u.model.state_dict())
                snaps.append(fresh)
                opt.zero_grad()
                for x, y, c in u.micro:
                    (c * u.loss_fn(*u.loss_input(u.call(u.model, x), y))).backward()
                opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    assert run.reasons("alpha") == {}
    assert run.series("alpha")[1][0] == pytest.approx(reference_alpha(u, *snaps), abs=1e-3)


@pytest.mark.parametrize("name", ["vit", "text_cnn", "bce_multilabel_pos_weight", "mse_per_position",
                                  "class_weights_smoothing", "layer_zoo_weight_norm"])
def test_hess_max_ev_against_a_dense_hessian(tmp_path, name):
    """hess_max_ev within 1e-3 of the top eigenvalue of the dense float64 Hessian of the step's loss (math
    attention kernel for the reference: the fused one has no double backward); hess_trace exact or labelled
    an estimate with its standard error. mse_per_position reads the loss input by an inline squeeze(-1)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from curvature_reference import hessian

    u = cases()[name]()
    (x, y, _), = u.micro
    theta = {n: p.detach().clone() for n, p in u.model.named_parameters() if p.requires_grad}
    fn = copy.deepcopy(u.loss_fn).double()
    with sdpa_kernel(SDPBackend.MATH):
        H = hessian(u.model, lambda o, t: fn(*u.loss_input(o, t)), x, y, theta)
    _, rec = run_case(u, tmp_path, {"hess_trace": "every", "hess_max_ev": "every"})
    assert rec.get("reasons", {}) == {}, rec.get("reasons")
    assert rec["values"]["hess_max_ev"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-3)
    if rec["data"]["hess_trace"]["method"].startswith("exact"):
        assert rec["values"]["hess_trace"] == pytest.approx(float(H.trace()), rel=1e-4)
    else:
        assert float(rec["values"]["hess_trace/stderr"]) > 0


def test_ctc_loss_per_sample_gradients_exact_and_losses_nan_with_reason(tmp_path):
    """nn.CTCLoss (mean: each sample's loss divided by its target length, then the batch mean) on the
    transposed [T, B, C] log-probabilities: per-sample gradients equal grad(ctc_i / len_i) in float64; the
    per-sample losses cannot be grouped (no forward AD for CTC) and are NaN with the reason."""
    from torch import nn

    from helpers import Probe

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 5)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))).log_softmax(-1)

    g = torch.Generator().manual_seed(0)
    B, T = 4, 8
    x, tg = torch.randn(B, T, 6, generator=g), torch.randint(1, 5, (B, 3), generator=g)
    tl, il = torch.tensor([3, 1, 2, 3]), torch.full((B,), T)
    torch.manual_seed(0)
    m, crit, probe = M(), nn.CTCLoss(), Probe()
    before = copy.deepcopy(m).double()
    opt = torch.optim.SGD(m.parameters(), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(m, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=[probe]):
            opt.zero_grad()
            crit(m(x).transpose(0, 1), tg, il, tl).backward()
            opt.step()
    assert probe.unsupported == {} and probe.losses_reason and torch.isnan(probe.losses).all()
    params = list(before.parameters())
    for i in range(B):
        li = nn.CTCLoss(reduction="sum")(before(x[i:i + 1].double()).transpose(0, 1), tg[i:i + 1], il[i:i + 1],
                                         tl[i:i + 1]) / tl[i]
        for G, r in zip(probe.G, torch.autograd.grad(li, params)):
            torch.testing.assert_close(G[i].double(), r, rtol=1e-4, atol=1e-6)


def test_inline_shifted_copy_curvature_is_nan_with_a_reason(tmp_path):
    """crit(model(x)[:, :-1].contiguous().view(-1, V), y[:, 1:]...) written inline: the loss input reshapes a
    copy of a part of the output; curvature cannot re-evaluate it and says so (was a raw 'shape [16, 11] is
    invalid for input of size 220'); the per-sample values stay exact (the main test above)."""
    u = cases()["hf_shift_inline"]()
    _, rec = run_case(u, tmp_path, {"hess_max_ev": "every", "hess_trace": "every"})
    for key in ("hess_max_ev", "hess_trace"):
        reason = rec["reasons"][key]  # the copy is named: a reshape it is not, or a copy in another layout
        assert math.isnan(float(rec["values"][key])) and ("not a reshape" in reason or "is a copy of the model output"
                                                          in reason), rec["reasons"]
