"""One optimizer step = one step: gradient accumulation, GradScaler skips, cleared gradients."""

import numpy as np
import pytest
import torch
from torch import nn

import cockpit_lite


def model_and_opt(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)


def data(n, bs=4, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 5, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def test_gradient_accumulation_counts_optimizer_steps(logdir):
    accum, steps = 4, 3
    crit = nn.CrossEntropyLoss()
    batches = data(accum * steps)
    # reference: accumulated gradient norm and mean loss over the effective batch
    ref_model, ref_opt = model_and_opt()
    ref_losses, ref_norms = [], []
    for s in range(steps):
        ref_opt.zero_grad()
        losses = []
        for x, y in batches[s * accum:(s + 1) * accum]:
            loss = crit(ref_model(x), y)
            (loss / accum).backward()
            losses.append(loss.item())
        ref_losses.append(np.mean(losses))
        ref_norms.append(torch.cat([p.grad.flatten() for p in ref_model.parameters()]).norm().item())
        ref_opt.step()

    model, opt = model_and_opt()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for s in range(steps):
            opt.zero_grad()
            for x, y in batches[s * accum:(s + 1) * accum]:
                (crit(model(x), y) / accum).backward()
            opt.step()
    run = cockpit_lite.load(logdir)
    assert len(run) == steps and not run.skipped
    assert [r["backward_passes"] for r in run] == [accum] * steps
    np.testing.assert_allclose(run.series("loss")[1], ref_losses, rtol=1e-6)
    np.testing.assert_allclose(run.series("grad_norm")[1], ref_norms, rtol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


def test_gradscaler_skip_is_recorded(logdir):
    model, opt = model_and_opt()
    crit = nn.CrossEntropyLoss()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    batches = data(4)
    x_bad = batches[1][0].clone()
    x_bad[0, 0] = float("inf")  # -> non-finite gradients at step 1
    batches[1] = (x_bad, batches[1][1])
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for x, y in batches:
            opt.zero_grad()
            scaler.scale(crit(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
    run = cockpit_lite.load(logdir)
    assert [r["step"] for r in run] == [0, 2, 3]
    assert len(run.skipped) == 1 and run.skipped[0]["step"] == 1
    assert "without optimizer.step()" in run.skipped[0]["reason"]
    assert "not finite" in run.skipped[0]["reason"]
    # gradients were unscaled before the step hooks: grad_norm is of the true gradient
    assert all(np.isfinite(run.series("grad_norm")[1]))


def test_cleared_gradients_without_step_is_a_skip(logdir):
    model, opt = model_and_opt()
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for i, (x, y) in enumerate(data(3)):
            crit(model(x), y).backward()
            if i != 1:
                opt.step()
            model.zero_grad()  # not the optimizer's zero_grad: seen at the next forward
    run = cockpit_lite.load(logdir)
    assert [r["step"] for r in run] == [0, 2]
    assert [s["step"] for s in run.skipped] == [1]


def test_nonfinite_loss_is_logged_and_flagged(logdir):
    model, opt = model_and_opt()
    crit = nn.CrossEntropyLoss()
    batches = data(3)
    with pytest.warns(RuntimeWarning, match="nonfinite"):
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
            for i, (x, y) in enumerate(batches):
                opt.zero_grad()
                if i == 1:
                    x = x * float("nan")
                crit(model(x), y).backward()
                opt.step()
    run = cockpit_lite.load(logdir)
    loss = run.series("loss")[1]
    assert np.isnan(loss[1]) and np.isfinite(loss[0])
    assert 1 in run.flagged("nonfinite_loss") and 1 in run.flagged("nonfinite_grad")
    assert any("nonfinite" in e["message"] for e in run.events)


def test_eval_forward_under_no_grad_is_ignored(logdir):
    model, opt = model_and_opt()
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for x, y in data(2):
            opt.zero_grad()
            crit(model(x), y).backward()
            opt.step()
            with torch.no_grad():
                crit(model(x), y)  # validation: not a micro-batch
    run = cockpit_lite.load(logdir)
    assert [r["backward_passes"] for r in run] == [1, 1] and not run.skipped


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_step_with_a_closure_is_observed_after_the_closure_computed_the_gradients(tmp_path, how):
    """``optimizer.step(closure)`` runs forward and backward inside the step, after the step pre-hooks
    (Lightning steps this way): the cockpit must read the gradients the closure computed, not the last
    step's, and log the same values as the usual loop."""
    quantities = {q: "every" for q in ("loss", "grad_norm", "update_size", "norm_test", "inner_test", "alpha")}
    runs = []
    for name in ("plain", how):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        loss_fn = nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(3)
        with cockpit_lite.watch(model, opt, loss_fn=loss_fn, logdir=tmp_path / name, quantities=quantities):
            for _ in range(4):
                x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = loss_fn(model(x), y)
                    loss.backward()
                    return loss

                if name == "plain":
                    closure()
                    opt.step()
                elif name == "positional":
                    opt.step(closure)
                else:
                    opt.step(closure=closure)
        runs.append(cockpit_lite.load(tmp_path / name))
    plain, closed = runs
    for key in quantities:
        s1, v1 = plain.series(key)
        s2, v2 = closed.series(key)
        assert list(s1) == list(s2) and len(s1) >= 3, key
        assert [round(v, 10) for v in v1 if v == v] == [round(v, 10) for v in v2 if v == v], key
    assert not any(r.get("reasons") for r in closed.records if r.get("type") == "step" and r["step"] < 3)


def test_cleared_gradients_on_a_step_that_keeps_model_inputs(logdir):
    """The skip is recorded inside the forward pre-hook, which then goes on keeping the model's inputs
    (curvature needs them): the forward's own bookkeeping must survive the skip record."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with cockpit_lite.watch(net, opt, loss_fn=loss_fn, logdir=logdir, quantities={"hess_trace": "every", "loss": "every"}):
        loss_fn(net(x), y).backward()
        net.zero_grad()  # discarded: gradients cleared on the model, not through the optimizer
        loss_fn(net(x), y).backward()
        opt.step()
    run = cockpit_lite.load(logdir)
    assert len(run.skipped) == 1 and len(run) == 1
    record = run.records[0]
    assert record["backward_passes"] == 1 and np.isfinite(record["values"]["hess_trace"])


def test_lbfgs_evaluating_its_closure_several_times_is_one_step(logdir):
    """L-BFGS calls the closure (zero_grad, forward, backward) up to max_iter times inside one step: the
    step is observed at the first evaluation; the later ones are neither micro-batches nor skipped steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    crit = nn.CrossEntropyLoss()
    batches = data(3, bs=6)
    first_losses = []
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir,
                            quantities=["loss", "grad_norm", "update_size", "norm_test"]):
        for x, y in batches:
            evaluations = []

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = crit(model(x), y)
                loss.backward()
                evaluations.append(loss.item())
                return loss

            opt.step(closure)
            assert len(evaluations) > 1  # the case under test: several evaluations per step
            first_losses.append(evaluations[0])
    run = cockpit_lite.load(logdir)
    assert [r["step"] for r in run] == [0, 1, 2] and not run.skipped
    assert run.footer["steps"] == 3
    assert [r["backward_passes"] for r in run] == [1, 1, 1]
    np.testing.assert_allclose(run.series("loss")[1], first_losses, rtol=1e-6)
    assert all(np.isfinite(run.series("norm_test")[1])) and all(np.isfinite(run.series("update_size")[1]))


def test_model_zero_grad_keeping_zero_tensors_marks_a_skipped_step(logdir):
    """``model.zero_grad(set_to_none=False)`` after a backward pass without an optimizer step (a GradScaler
    skip) leaves zero tensors, which the next forward cannot tell from accumulation: the call itself marks it."""
    model, opt = model_and_opt()
    crit = nn.CrossEntropyLoss()
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=logdir):
        for i, (x, y) in enumerate(data(4)):
            model.zero_grad(set_to_none=False)
            crit(model(x), y).backward()
            if i != 1:
                opt.step()
    run = cockpit_lite.load(logdir)
    assert [r["step"] for r in run] == [0, 2, 3]
    assert [s["step"] for s in run.skipped] == [1]
    assert [r["backward_passes"] for r in run] == [1, 1, 1]
    assert "zero_grad" not in model.__dict__ and "zero_grad" not in opt.__dict__  # unpatched at close
