"""Round 4 of training loops cockpit-lite had not seen (brief probe_loops): every logged value of the
step quantities (``quantity_truth.ALL``: loss, lr, grad_norm, param_norm, distance, update_size, alpha,
the gradient-noise tests, histograms) against the float64 brute force of what the loop really did, or NaN
with a reason; one logged step per optimizer step taken, and no crash caused by the cockpit."""

import math
import time

import pytest
import torch
from torch import nn
from torch.func import functional_call

import cockpit_lite
from quantity_truth import ALL, CE, all_mismatches, batches, ce_of, mlp, watched


def plain(m, opt, crit, x, y, t, set_to_none=True):
    opt.zero_grad(set_to_none=set_to_none)
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    t.note_grad()
    opt.step()


def run_plain(tmp_path, opt_of, steps=4, sched_of=None, set_to_none=True, crit=None, per_sample=None):
    m, crit = mlp(), crit or nn.CrossEntropyLoss()
    opt = opt_of(m)
    sched = sched_of(opt) if sched_of else None

    def loop(t):
        for x, y in batches(steps):
            t.begin(per_sample(x, y) if per_sample else ce_of(x, y))
            plain(m, opt, crit, x, y, t, set_to_none)
            if sched is not None:
                sched.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


# -- optimizers, schedules and zero_grad variants in the plain loop ----------------------------------------
SETUPS = {
    "onecycle_sgd_nesterov": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
                              lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=10)),
    "onecycle_sgd_momentum": (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.8),
                              lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.3, total_steps=6,
                                                                            cycle_momentum=True)),
    "adam_no_foreach_no_fused": (lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False, fused=False),
                                 None),
    "adamw_amsgrad": (lambda m: torch.optim.AdamW(m.parameters(), lr=0.02, weight_decay=0.3, amsgrad=True), None),
}


@pytest.mark.parametrize("name", list(SETUPS))
def test_optimizer_and_schedule(tmp_path, name):
    opt_of, sched_of = SETUPS[name]
    run, truth, m = run_plain(tmp_path, opt_of, sched_of=sched_of)
    assert all_mismatches(run, truth, m) == []
    assert all(math.isfinite(float(r["values"]["alpha"])) for r in list(run)[:-1])


def test_zero_grad_to_zeros(tmp_path):
    run, truth, m = run_plain(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                              set_to_none=False)
    assert all_mismatches(run, truth, m) == []
    assert all(math.isfinite(float(r["values"]["norm_test"])) for r in run)


def test_sum_reduced_loss(tmp_path):
    """``reduction='sum'``: the loss logged is the sum; l_i are the samples' losses (the module's scale, as
    for accumulation of sum-reduced micro-batches: ``loss_elements.py``)."""
    run, truth, m = run_plain(tmp_path, lambda m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9),
                              crit=nn.CrossEntropyLoss(reduction="sum"))
    assert all_mismatches(run, truth, m) == []


def test_closure_sgd(tmp_path):
    """``optimizer.step(closure)`` with SGD (one evaluation per step)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True)

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = crit(m(x), y)
                loss.backward()
                t.note_loss(loss.item())
                t.note_grad()
                return loss
            opt.step(closure)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    assert all(math.isfinite(float(r["values"]["norm_test"])) for r in run)


# -- gradient accumulation with loss / accum over unequal micro-batches -------------------------------------
def test_accumulation_divided_by_count_unequal_micro_batches(tmp_path):
    """``(loss / accum).backward()`` per micro-batch of 4 and 2 samples: .grad is (g_1 + g_2) / 2, which
    weighs the samples unequally. The project's convention (README "Loss and its scale", as in
    test_unseen_setups' partial last batch): l_i is sample i's own loss whatever factor the loop applied, the
    loss logged is their mean over the 6 samples (not the loop's sum of loss / accum), grad_norm is ||.grad||."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    sizes, accum = (4, 2), 2

    def loop(t):
        for _ in range(4):
            mbs = [(torch.randn(s, 5, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
            t.begin(lambda m64, mbs=mbs: torch.cat([CE(m64(a.double()), b) for a, b in mbs]))
            opt.zero_grad()
            total = 0.0
            for a, b in mbs:
                loss = crit(m(a), b)
                (loss / accum).backward()
                total += loss.item() * len(b) / sum(sizes)
            t.note_loss(total)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    assert all(math.isfinite(float(r["values"]["norm_test"])) for r in run)


# -- parameters frozen mid-run and unfrozen; a param group added mid-run -----------------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_mid_run_then_unfrozen(tmp_path, set_to_none):
    """The first layer is frozen after step 3 (``requires_grad_(False)``) and unfrozen at step 6. With
    ``zero_grad(set_to_none=False)`` its .grad stays a zero tensor and SGD's momentum keeps moving it: the
    update taken includes that move. Found here: alpha took the frozen layer's slope as 0 where the update
    moved it (step 2, whose end point is frozen: 0.0065 for 0.0162; with zero .grad steps 3-5: -0.84 for -1,
    1.28 for 1.14, -10.7 for -6.6). Now NaN with the reason there (the brute force's slopes use every
    moved parameter's gradient, ``loop_truth.full_grads``)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for k, (x, y) in enumerate(batches(8)):
            for p in m[0].parameters():
                p.requires_grad_(not 3 <= k < 6)
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t, set_to_none)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    alpha = {r["step"]: r for r in run}
    assert "had no gradient on step 2 or 3" in alpha[2]["reasons"]["alpha"]  # d_2 moved the layer frozen at 3
    assert math.isfinite(float(alpha[1]["values"]["alpha"])) and math.isfinite(float(alpha[6]["values"]["alpha"]))
    for k in (3, 4, 5):  # zero .grad: momentum moves the frozen layer; None: it stays, alpha exact
        assert math.isnan(float(alpha[k]["values"]["alpha"])) != set_to_none, k


def test_param_group_added_mid_run_for_a_new_module(tmp_path):
    """Adam on body and head; at step 2 a layer joins the forward (a residual branch, zero at the start) and
    its parameters are added with ``add_param_group`` (not watched: said by a warning): the watched values stay
    exact or NaN with a reason (alpha of step 1 and later: the new layer moves off the watched update)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Sequential(nn.Linear(5, 8), nn.Tanh()), nn.Linear(8, 3)
            self.extra, self.grown = nn.Linear(8, 8), False
            nn.init.zeros_(self.extra.weight)
            nn.init.zeros_(self.extra.bias)

        def forward(self, x):
            h = self.body(x)
            if self.grown:
                h = h + self.extra(h)
            return self.head(h)

    m, crit = Net(), nn.CrossEntropyLoss()
    opt = torch.optim.Adam(list(m.body.parameters()) + list(m.head.parameters()), lr=0.01)

    def loop(t):
        for k, (x, y) in enumerate(batches(5)):
            if k == 2:
                m.grown = True
                opt.add_param_group({"params": list(m.extra.parameters()), "lr": 0.05})
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            t.stepped()

    with pytest.warns(RuntimeWarning, match="add_param_group"):
        run, truth = watched(tmp_path, m, opt, loop, crit, observed={"body.0.weight", "body.0.bias", "head.weight",
                                                                     "head.bias"})
    assert all_mismatches(run, truth, m) == []


# -- clip_grad_norm_(foreach=True, error_if_nonfinite=True) on a NaN loss ---------------------------------
def test_clip_error_if_nonfinite_on_a_nan_loss(tmp_path):
    """Step 2's loss is NaN; ``clip_grad_norm_`` raises, the loop catches it and skips the step (zero_grad,
    next batch). The log says the step was skipped (gradients not finite), the other steps stay exact."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for k, (x, y) in enumerate(batches(5)):
            t.begin(ce_of(x, y))
            opt.zero_grad()
            loss = crit(m(x * (float("nan") if k == 2 else 1.0)), y)
            loss.backward()
            try:
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True, error_if_nonfinite=True)
            except RuntimeError:
                opt.zero_grad()
                continue
            t.note_preclip()
            t.note_loss(loss.item())
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m, skipped=(2,), skip=("grad_norm_preclip",)) == []
    (skipped,) = run.skipped
    assert skipped["step"] == 2 and "not finite" in skipped["reason"]


def test_clip_error_if_nonfinite_uncaught_keeps_the_log(tmp_path):
    """The same error not caught: the loop's own exception leaves the ``with`` block; the steps before it are
    in the log and the attempt that raised is recorded."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="non-finite"):
        with cockpit_lite.watch(m, opt, loss_fn=crit, logdir=tmp_path / "run", quantities="full"):
            for k, (x, y) in enumerate(batches(4)):
                opt.zero_grad()
                crit(m(x * (float("nan") if k == 2 else 1.0)), y).backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True, error_if_nonfinite=True)
                opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    assert [r["step"] for r in run] == [0, 1]
    assert [s["step"] for s in run.skipped] == [2]


# -- torch.autograd.grad, gradients assigned by hand ---------------------------------------------------------
def test_autograd_grad_assigned_by_hand(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    params = list(m.parameters())

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))
            opt.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            grads = torch.autograd.grad(loss, params)
            for p, gr in zip(params, grads):
                p.grad = gr
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []


# -- sharpness-aware minimization ---------------------------------------------------------------------------
def test_sam(tmp_path):
    """SAM written in the loop: backward at w, w + e with e = rho g / ||g||, backward there, w restored, one
    SGD step from w with the second gradient. The quantities of the gradient describe the second one (l_i at
    w + e); those of the parameters w, or NaN with a reason. Found here: every ascent pass (backward, then
    zero_grad without a step) was logged as a skipped step (steps 1, 3, 5, 7 for 4 optimizer steps). Now the
    in-place change of the parameters after it says it was a probe (engine/param_versions.py): dropped, with a
    warning; the step's gradient values are the second pass's, exact, and param_norm, distance, update_size and
    alpha NaN (the parameters changed after the gradient was taken); its time includes the ascent pass."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    names = [n for n, _ in m.named_parameters()]
    rho = 0.05

    def loop(t):
        for x, y in batches(4):
            t.begin(None)
            opt.zero_grad()
            crit(m(x), y).backward()
            time.sleep(0.03)  # the ascent pass is part of the step's time
            with torch.no_grad():
                gn = torch.norm(torch.stack([p.grad.norm() for p in m.parameters()]))
                eps = [rho * p.grad / gn for p in m.parameters()]
                for p, e in zip(m.parameters(), eps):
                    p.add_(e)
            shift = {n: e.detach().double().clone() for n, e in zip(names, eps)}
            t.pending["per_sample"] = lambda m64, x=x, y=y, shift=shift: CE(functional_call(
                m64, {n: p + shift[n] for n, p in m64.named_parameters()}, (x.double(),)), y)
            opt.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            loss.backward()
            with torch.no_grad():
                for p, e in zip(m.parameters(), eps):
                    p.sub_(e)
            t.note_grad()
            opt.step()
            t.stepped()

    with pytest.warns(RuntimeWarning, match="ascent pass"):
        run, truth = watched(tmp_path, m, opt, loop, crit, quantities=dict(ALL, time="every"))
    assert all_mismatches(run, truth, m) == []
    assert not run.skipped
    assert all(r["values"]["time"] >= 0.03 for r in run)  # was: from the second forward only
    first = next(iter(run))
    assert math.isfinite(float(first["values"]["norm_test"]))
    assert "between the backward pass and optimizer.step()" in first["reasons"]["param_norm"]


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization as davda54/sam writes it (abridged): a wrapper sharing its base optimizer's
    parameter groups; w + e in ``first_step``, w restored through ``p.data = old_p`` (no version bump) and the
    base optimizer's step in ``second_step``; ``step(closure)`` runs the three."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad=False):
        norm = torch.norm(torch.stack([p.grad.norm() for g in self.param_groups for p in g["params"]
                                       if p.grad is not None]))
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["old_p"] = p.data.clone()
                    p.add_(p.grad * group["rho"] / (norm + 1e-12))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad=False):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure=None):
        self.first_step(zero_grad=True)
        torch.enable_grad()(closure)()
        self.second_step()


@pytest.mark.parametrize("usage", ["first_second_step", "step_closure", "every_other_step"])
def test_sam_optimizer_class(tmp_path, usage):
    """The SAM wrapper watched as the loop's optimizer. Found here: with first_step / second_step (its README's
    loop) the wrapper's step() never runs and the log had no step at all; the base optimizer's step is now the
    step (engine/setup.py ``stepping_optimizer``). Its restore through ``.data`` bumps no version: the norms kept
    at the ascent pass show it (param_norm, distance, update_size, alpha NaN with the reason); the gradient's
    values are those of the second pass, at w + e, exact. Also SAM on every other step only: the end point of the
    plain step's alpha is at a SAM step's w + e (NaN with the reason, was a fit through the wrong point)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    sam = SAM(m.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    params = dict(m.named_parameters())

    def at_ascent(t, x, y):
        shift = {n: (p.detach() - sam.state[p]["old_p"]).double() for n, p in params.items()}
        t.pending["per_sample"] = lambda m64: CE(functional_call(
            m64, {n: p + shift[n] for n, p in m64.named_parameters()}, (x.double(),)), y)

    def loop(t):
        for k, (x, y) in enumerate(batches(5)):
            if usage == "every_other_step" and k % 2 == 0:  # a plain step of the base optimizer
                t.begin(ce_of(x, y))
                plain(m, sam.base_optimizer, crit, x, y, t)
                t.stepped()
                continue
            t.begin(None)
            crit(m(x), y).backward()
            if usage != "step_closure":
                sam.first_step(zero_grad=True)
                at_ascent(t, x, y)
                loss = crit(m(x), y)
                loss.backward()
                t.note_loss(loss.item())
                t.note_grad()
                sam.second_step(zero_grad=True)
            else:
                def closure(x=x, y=y):
                    at_ascent(t, x, y)
                    loss = crit(m(x), y)
                    loss.backward()
                    t.note_loss(loss.item())
                    t.note_grad()
                    return loss
                sam.step(closure)
                sam.zero_grad()
            t.stepped()

    with pytest.warns(RuntimeWarning, match="ascent pass"):
        run, truth = watched(tmp_path, m, sam, loop, crit)
    assert all_mismatches(run, truth, m) == []
    assert not run.skipped and len(list(run)) == 5
    rec = {r["step"]: r for r in run}
    assert math.isfinite(float(rec[1]["values"]["norm_test"]))
    assert "between the backward pass and optimizer.step()" in rec[1]["reasons"]["update_size"]
    if usage == "every_other_step":  # the plain steps' own values stay; alpha's end point at a SAM step is NaN
        assert math.isfinite(float(rec[2]["values"]["update_size"]))
        assert "the end point, step 1" in rec[0]["reasons"]["alpha"]
