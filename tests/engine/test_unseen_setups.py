"""More user loops against the float64 brute force (``loop_truth.py``): skipped steps, clipping by value,
schedulers, accumulation that varies per step or goes through one input buffer, CNN layouts, bf16 autocast
and torch.compile, terms added to the loss outside loss_fn, optimizer groups added after watch(), loss
modules whose mean is not over the batch. Helpers: ``test_unseen_loops.py``."""

import pytest
import torch
from torch import nn

import cockpit_lite
from loop_truth import QUANTITIES, Truth, mismatches
from test_unseen_loops import CE, TwoHeads, batches, body_mismatches, ce_of, mlp, plain, watched

# -- skipped steps, clipping by value, schedulers, accumulation that varies per step ------------------------
def test_user_skip_and_gradscaler_skip(tmp_path):
    """A step the loop skips after backward (its own isfinite check, or a GradScaler's inf) is logged as
    skipped under its number; the steps around it keep their values (alpha only across taken steps)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)

    def loop(t):
        for k, (x, y) in enumerate(batches(6)):
            t.begin(ce_of(x, y))
            opt.zero_grad(set_to_none=False)
            loss = crit(m(x), y) * (float("inf") if k in (1, 4) else 1.0)
            if k < 3:
                loss.backward()
                if not torch.isfinite(loss):
                    continue
                t.note_loss(loss.item())
                t.note_grad()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                if k != 4:
                    t.note_loss(loss.item())
                    t.note_grad()
                scaler.step(opt)
                scaler.update()
                if k == 4:
                    continue
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m, skip=("alpha",), skipped=(1, 4)) == []


def clip_value_no_none(m, opt, crit, x, y, t, k):
    opt.zero_grad(set_to_none=False)
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    torch.nn.utils.clip_grad_value_(m.parameters(), 0.05)  # per-sample values: NaN (the self-check sees it)
    t.note_grad()
    opt.step()
    m._sched.step()


def test_clip_by_value_adamw_one_cycle(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(m.parameters(), lr=0.05)
    m._sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert body_mismatches(tmp_path, m, opt, crit, clip_value_no_none, 4) == []


def test_accumulation_varying_per_step_with_a_partial_last_batch(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(5)
    steps = [[(torch.randn(s, 5, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
             for sizes in ([6, 6, 6], [6], [6, 2], [5, 3])]

    def loop(t):
        for mbs in steps:
            t.begin(lambda m64, mbs=mbs: torch.cat([CE(m64(a.double()), b) for a, b in mbs]))
            opt.zero_grad()
            losses = []
            for a, b in mbs:
                loss = crit(m(a), b)
                (loss / len(mbs)).backward()
                losses.append((loss.item(), len(b)))
            t.note_loss(sum(v * n for v, n in losses) / sum(n for _, n in losses))
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert [r["samples"] for r in run] == [18, 6, 8, 8]


# -- compiled, channels_last, bf16 autocast ------------------------------------------------------------------
def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))


@pytest.mark.parametrize("how", ["channels_last", "autocast_bf16", "compile_eager", "compile_aot_eager",
                                 pytest.param("compile_inductor", marks=pytest.mark.slow)])
def test_cnn_layouts_precisions_and_compile(tmp_path, how):
    m, crit = cnn(), nn.CrossEntropyLoss()
    if how == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    forward = torch.compile(m, backend=how.split("_", 1)[1]) if how.startswith("compile") else m
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(6, 2, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(4)]

    def loop(t):
        for x, y in data:
            t.begin(ce_of(x, y))
            opt.zero_grad()
            x_in = x.to(memory_format=torch.channels_last) if how == "channels_last" else x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast_bf16"):
                loss = crit(forward(x_in), y)
            t.note_loss(loss.item())
            loss.backward()
            t.note_grad()
            opt.step()
            t.stepped()

    truth = Truth(m)
    with cockpit_lite.watch(forward, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=QUANTITIES):
        loop(truth)
    run = cockpit_lite.load(tmp_path / "run")
    # bf16: the brute force is the float64 model, the step ran in bf16 (about 3 significant digits)
    tol, skip = (2e-2, ("alpha",)) if how == "autocast_bf16" else (1e-4, ())
    assert mismatches(run, truth, m, tol=tol, skip=skip) == []


# -- a term added to the loss outside loss_fn ---------------------------------------------------------------
MSE = nn.MSELoss(reduction="none")


def test_penalty_on_the_output_added_outside_loss_fn(tmp_path):
    """loss = crit(out, y) + 0.1 * out.pow(2).mean(): the logged loss is loss_fn's; the self-check's replay of
    loss_fn alone does not explain .grad, so the per-sample values are NaN with that reason (they were a mix
    of replayed loss_fn-only and layer-rule values: finite and wrong)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for x, y in batches(4):
            t.begin(lambda m64, x=x, y=y: CE(m64(x.double()), y) + 0.1 * m64(x.double()).pow(2).mean(1))
            opt.zero_grad()
            out = m(x)
            loss = crit(out, y)
            t.note_loss(loss.item())
            (loss + 0.1 * out.pow(2).mean()).backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    why = next(iter(run))["reasons"]["norm_test"]
    # the self-check's replay or the mean check (persample/mean_grad.py), whichever sees it first
    assert "not only loss_fn's" in why or "not proportional to .grad" in why, why


def test_second_loss_module_on_another_head(tmp_path):
    """(a, b) = model(x); crit(a, y) + mse(b, z) with mse not watched: the MSE is part of the gradient but not
    of loss_fn's per-sample losses (alpha was finite and wrong)."""
    m, crit, mse = TwoHeads(), nn.CrossEntropyLoss(), nn.MSELoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for x, y in batches(4):
            z = torch.full((x.shape[0], 3), 0.3)
            t.begin(lambda m64, x=x, y=y, z=z: CE(m64(x.double())[0], y) + MSE(m64(x.double())[1], z.double()).mean(1))
            opt.zero_grad()
            a, b = m(x)
            loss = crit(a, y)
            t.note_loss(loss.item())
            (loss + mse(b, z)).backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    rec = next(iter(run))
    # its noise tests could be exact (MSE is per sample), but alpha's losses miss the MSE part: NaN for both
    assert "without going through loss_fn" in rec["reasons"]["alpha"]
    assert "without going through loss_fn" in rec["reasons"]["norm_test"]


class WithAuxLoss(nn.Module):
    """Returns (logits, aux): aux a batch-level regulariser the loop adds to the loss (as MoE routers do)."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        h = self.net[1](self.net[0](x))
        return self.net[2](h), h.mean(0).pow(2).sum()


def test_auxiliary_loss_returned_by_the_model(tmp_path):
    m, crit = WithAuxLoss(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for x, y in batches(4):
            t.begin(lambda m64, x=x, y=y: CE(m64(x.double())[0], y) + 0.1 * m64(x.double())[1])
            opt.zero_grad()
            logits, aux = m(x)
            loss = crit(logits, y)
            t.note_loss(loss.item())
            (loss + 0.1 * aux).backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert "without going through loss_fn" in next(iter(run))["reasons"]["inner_test"]


def test_param_group_added_after_watch_is_said_and_the_values_cover_the_header(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    for p in m[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m[2].parameters(), lr=0.1)
    truth = Truth(m, observed={"2.weight", "2.bias"})
    with pytest.warns(RuntimeWarning, match="add_param_group"):
        with cockpit_lite.watch(m, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=QUANTITIES):
            for k, (x, y) in enumerate(batches(4)):
                if k == 2:  # unfreeze the body part-way
                    for p in m[0].parameters():
                        p.requires_grad_(True)
                    opt.add_param_group({"params": list(m[0].parameters()), "lr": 0.05})
                truth.begin(ce_of(x, y))
                plain(m, opt, crit, x, y, truth)
                truth.stepped()
    run = cockpit_lite.load(tmp_path / "run")
    assert mismatches(run, truth, m) == []
    assert any("add_param_group" in e.get("message", "") for e in run.events)


# -- loss modules whose mean is not over B: l_i is scaled so that its mean is the mini-batch loss ------------
W = torch.tensor([0.2, 1.0, 3.0])


@pytest.mark.parametrize("kind", ["class_weights", "ignore_index", "sum_divided_by_B", "label_smoothing"])
def test_loss_module_variants(tmp_path, kind):
    m = mlp()
    crit = {"class_weights": nn.CrossEntropyLoss(weight=W), "ignore_index": nn.CrossEntropyLoss(),
            "sum_divided_by_B": nn.CrossEntropyLoss(reduction="sum"),
            "label_smoothing": nn.CrossEntropyLoss(label_smoothing=0.1)}[kind]
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def per_sample(x, y):
        if kind == "class_weights":  # mean = sum_i w_yi ce_i / sum_i w_yi
            return lambda m64: 6 * nn.CrossEntropyLoss(weight=W.double(), reduction="none")(m64(x.double()), y) / W.double()[y].sum()
        if kind == "ignore_index":  # mean over the rows not ignored
            return lambda m64: 6 * CE(m64(x.double()), y) / (y != -100).sum()
        if kind == "label_smoothing":
            return lambda m64: nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")(m64(x.double()), y)
        return ce_of(x, y)

    def loop(t):
        for k, (x, y) in enumerate(batches(4)):
            if kind == "ignore_index":
                y = y.clone()
                y[k % 3] = -100
            t.begin(per_sample(x, y))
            opt.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())  # the loss module's value (sum: not divided)
            (loss / 6 if kind == "sum_divided_by_B" else loss).backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []


def test_an_optimizer_of_loss_weights_stepping_before_the_watched_one(tmp_path):
    """Learned task weights with their own optimizer, stepped between backward and the model's step: the
    model's step keeps its micro-batch."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    scale = nn.Parameter(torch.tensor(1.0))
    opt, opt_w = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD([scale], lr=0.01)

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))
            opt.zero_grad()
            opt_w.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            (loss * scale.detach() + (scale - 1).pow(2)).backward()
            t.note_grad()
            opt_w.step()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert all(isinstance(r["values"]["norm_test"], float) for r in run)


def test_accumulation_through_one_input_buffer_refilled_in_place(tmp_path):
    """A static input buffer refilled per micro-batch (x_buf.copy_(x)) holds different samples each time."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    data = batches(6)
    x_buf = torch.empty(6, 5)

    def loop(t):
        for k in range(0, 6, 2):
            mbs = data[k:k + 2]
            t.begin(lambda m64, mbs=mbs: torch.cat([CE(m64(a.double()), b) for a, b in mbs]))
            opt.zero_grad()
            losses = []
            for x, y in mbs:
                x_buf.copy_(x)
                loss = crit(m(x_buf), y)
                (loss / 2).backward()
                losses.append(loss.item())
            t.note_loss(sum(losses) / 2)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert [r["samples"] for r in run] == [12, 12, 12]
    assert "modified in place" in next(iter(run))["reasons"]["norm_test"]
