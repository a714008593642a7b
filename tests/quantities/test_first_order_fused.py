"""The fused first-order set (one norm reduction per phase, cockpit_lite/norm_batch.py) against brute force.

Every logged norm (totals and per-parameter parts) of the default preset is compared with
``torch.linalg.vector_norm`` over float64 copies of ``.grad``, theta_t, theta_t - theta_0 and
theta_{t+1} - theta_t taken in an unwatched twin of the same loop (same seed, same data), for several
optimizers, a frozen parameter, a parameter without gradient and a bfloat16 parameter; and the failure
class: a norm that cannot be computed is NaN with a reason naming its quantity, the others unaffected.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite
from cockpit_lite import presets

KEYS = ("grad_norm", "grad_norm_preclip", "param_norm", "distance", "update_size")


class Net(nn.Module):
    def __init__(self, unused=False):
        super().__init__()
        self.a = nn.Linear(5, 12)
        self.b = nn.Linear(12, 3)
        self.unused = nn.Linear(2, 2) if unused else None  # in the optimizer, never in forward: .grad is None

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def data(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)) for _ in range(n)]


def norms64(tensors):
    parts = [torch.linalg.vector_norm(t.detach().to(torch.float64)).item() for t in tensors]
    return math.sqrt(sum(p * p for p in parts)), parts


def reference(make_model, make_opt, batches):
    """Every first-order norm of every step, by brute force in float64, in an unwatched loop."""
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    crit = nn.CrossEntropyLoss()
    params = [p for p in model.parameters()]
    theta0 = [p.detach().clone() for p in params]
    out = {k: [] for k in KEYS}
    for x, y in batches:
        opt.zero_grad()
        crit(model(x), y).backward()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        before = [p.detach().clone() for p in params]
        out["grad_norm"].append(norms64(grads))
        out["grad_norm_preclip"].append(norms64(grads))
        out["param_norm"].append(norms64(before))
        out["distance"].append(norms64([b.double() - t.double() for b, t in zip(before, theta0)]))
        opt.step()
        out["update_size"].append(norms64([p.detach().double() - b.double() for p, b in zip(params, before)]))
    names = [n for n, _ in model.named_parameters()]
    return out, names


def watched(make_model, make_opt, batches, logdir, quantities=None):
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir,
                            quantities=quantities or presets.preset("default")):
        for x, y in batches:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    return cockpit_lite.load(logdir)


OPTS = {
    "sgd": lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
    "momentum": lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
}


def _compare(run, expected, names, rtol=1e-5, keys=KEYS):
    for key in keys:
        rtol = max(rtol, 1e-6) if key == "grad_norm_preclip" else rtol  # kept in float32 (as documented)
        steps, got = run.series(key)
        assert list(steps) == list(range(len(expected[key]))), key
        np.testing.assert_allclose(got, [t for t, _ in expected[key]], rtol=rtol, atol=1e-12, err_msg=key)
        for i, name in enumerate(names):
            _, part = run.series(f"{key}/{name}")
            np.testing.assert_allclose(part, [p[i] for _, p in expected[key]], rtol=rtol, atol=1e-12,
                                       err_msg=f"{key}/{name}")


@pytest.mark.parametrize("opt", list(OPTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_norms_equal_brute_force(opt, dtype, tmp_path):
    make = lambda: Net(unused=True).to(dtype)  # noqa: E731
    batches = [(x.to(dtype), y) for x, y in data()]
    expected, names = reference(make, OPTS[opt], batches)
    run = watched(make, OPTS[opt], batches, tmp_path)
    _compare(run, expected, names, rtol=1e-5 if dtype == torch.float32 else 1e-12)
    # the parameter without gradient: its grad norm is 0, its parameter norm is not
    assert run.series("grad_norm/unused.weight")[1].tolist() == [0.0] * 4
    assert all(v > 0 for v in run.series("param_norm/unused.weight")[1])
    assert not run.reasons("grad_norm") and not run.reasons("grad_norm_preclip")


def test_frozen_parameter_and_bfloat16_parameter(tmp_path):
    def make():
        m = Net()
        m.a.bias.requires_grad_(False)  # frozen: not observed
        m.b.to(torch.bfloat16)
        return m

    class Cast(nn.Module):  # the bf16 layer gets bf16 inputs; the loss sees float32
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m.b(torch.tanh(self.m.a(x)).to(torch.bfloat16)).float()

    def make_cast():
        return Cast(make())

    def opt(m):
        return torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)

    expected, names = reference(make_cast, opt, data())
    run = watched(make_cast, opt, data(), tmp_path)
    names = [n for n, p in make_cast().named_parameters() if p.requires_grad]
    expected_obs = {k: [(t, [p for p, n in zip(parts, [n for n, _ in make_cast().named_parameters()])
                             if n in names]) for t, parts in v] for k, v in expected.items()}
    # totals over the observed parameters only (the frozen bias is not observed)
    for key in KEYS:
        expected_obs[key] = [(math.sqrt(sum(p * p for p in parts)), parts) for _, parts in expected_obs[key]]
    _compare(run, expected_obs, names, rtol=1e-5, keys=("grad_norm", "grad_norm_preclip", "param_norm"))
    # differences of bfloat16 parameters are taken in bfloat16 (as before the fusion): its rounding
    _compare(run, expected_obs, names, rtol=1e-2, keys=("distance", "update_size"))
    assert not run.has("grad_norm/m.a.bias")


class Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, sparse=True)
        self.out = nn.Linear(4, 3)

    def forward(self, i):
        return self.out(self.emb(i))


def _sparse_run(tmp_path, monkeypatch=None, fail_on=None):
    g = torch.Generator().manual_seed(0)
    # repeated indices: the embedding's sparse gradient is uncoalesced
    batches = [(torch.randint(0, 7, (12,), generator=g), torch.randint(0, 3, (12,), generator=g)) for _ in range(3)]
    torch.manual_seed(0)
    model = Sparse()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    ref = {"grad_norm": [], "param_norm": [], "distance": []}
    theta0 = [p.detach().clone().double() for p in model.parameters()]
    for x, y in batches:
        opt.zero_grad()
        crit(model(x), y).backward()
        ref["grad_norm"].append(norms64([p.grad.to_dense() for p in model.parameters()])[0])
        ref["param_norm"].append(norms64(list(model.parameters()))[0])
        ref["distance"].append(norms64([p.detach().double() - t for p, t in zip(model.parameters(), theta0)])[0])
        opt.step()
    torch.manual_seed(0)
    model = Sparse()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if fail_on is not None:  # the norm of one parameter's gradient raises (an unsupported tensor type)
        real = torch._foreach_norm

        def failing(tensors, *args, **kwargs):
            if any(t is fail_on(model) for t in tensors):
                raise RuntimeError("norm of this tensor type is not implemented")
            return real(tensors, *args, **kwargs)

        monkeypatch.setattr(torch, "_foreach_norm", failing)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path,
                            quantities=["grad_norm", "param_norm", "distance", "loss"]):
        for x, y in batches:
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
    return cockpit_lite.load(tmp_path), ref


def test_sparse_gradients_are_normed_exactly(tmp_path):
    run, ref = _sparse_run(tmp_path)
    for key, want in ref.items():
        np.testing.assert_allclose(run.series(key)[1], want, rtol=1e-5, atol=1e-12, err_msg=key)
        assert not run.reasons(key)


def test_a_norm_that_fails_is_nan_with_its_quantity_named_and_the_others_stand(tmp_path, monkeypatch):
    run, ref = _sparse_run(tmp_path, monkeypatch, fail_on=lambda m: m.emb.weight.grad)
    reasons = run.reasons("grad_norm")
    assert sorted(reasons) == [0, 1, 2] and all("grad_norm" in why and "not implemented" in why
                                                for why in reasons.values()), reasons
    assert all(math.isnan(v) for v in run.series("grad_norm")[1])
    for key in ("param_norm", "distance"):  # computed in the same fused reduction: recomputed on their own
        np.testing.assert_allclose(run.series(key)[1], ref[key], rtol=1e-5, atol=1e-12, err_msg=key)
        assert not run.reasons(key)


def test_norm_batch_mixed_lists_against_float64():
    """Groups of any dtype, shape, layout and size (empty included) in one flush: each value against
    torch.linalg.vector_norm in float64; shared requests computed once."""
    from cockpit_lite.norm_batch import NormBatch, convert

    g = torch.Generator().manual_seed(0)
    lists = [
        [],
        [torch.randn(3, 5, generator=g), torch.randn(7, generator=g, dtype=torch.float64), torch.randn((), generator=g)],
        [torch.randn(4, 4, generator=g).t()],  # not contiguous
        [torch.randn(6, generator=g).to(torch.bfloat16), torch.randn(2, 3, generator=g).half()],
        [torch.randn(300_000, generator=g)],
        [torch.sparse_coo_tensor([[0, 0, 2]], [1.0, 2.0, -3.0], (4,), check_invariants=True)],  # uncoalesced: 0 twice
    ]
    batch = NormBatch()
    groups = [batch.request(ts) for ts in lists]
    assert batch.request(lists[1], share="x") is batch.request(lists[2], share="x")  # the first one asked
    batch.flush()
    convert(batch.groups, {})
    for ts, group in zip(lists, groups):
        want = [torch.linalg.vector_norm(t.to_dense().to(torch.float64)).item() for t in ts]
        assert group.error is None
        np.testing.assert_allclose(group.values, want, rtol=1e-6)
        assert group.total == pytest.approx(math.sqrt(sum(w * w for w in want)), rel=1e-6)
