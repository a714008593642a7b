"""Training loops written the way users write them, none of which another test runs: every logged value
against a float64 brute force of what the loop really did (``loop_truth.py``), or NaN with a reason, and
one logged step per optimizer step taken."""

import pytest
import torch
from torch import nn

import cockpit_lite
from loop_truth import QUANTITIES, Truth, mismatches, plain

CE = nn.CrossEntropyLoss(reduction="none")


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def ce_of(x, y):
    return lambda m: CE(m(x.double()), y)


def watched(tmp_path, model, opt, loop, crit, **options):
    truth = Truth(model)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=QUANTITIES, **options):
        loop(truth)
    return cockpit_lite.load(tmp_path / "run"), truth


def body_mismatches(tmp_path, m, opt, crit, body, steps: int):
    """Train ``steps`` batches, each step ``body(m, opt, crit, x, y, truth, k)``, watched: the log's mismatches
    with the float64 brute force."""
    def loop(t):
        for k, (x, y) in enumerate(batches(steps)):
            t.begin(ce_of(x, y))
            body(m, opt, crit, x, y, t, k)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return mismatches(run, truth, m)


# -- loops whose extra work must not change the step: (name, body(m, opt, crit, x, y, truth, k)) ---------------
def closure_sgd(m, opt, crit, x, y, t, k):
    def closure():
        opt.zero_grad()
        loss = crit(m(x), y)
        loss.backward()
        if "grad" not in t.pending:
            t.note_loss(loss.item())
            t.note_grad()
        return loss
    opt.step(closure)


def eval_no_grad(m, opt, crit, x, y, t, k):
    with torch.no_grad():
        m(x + 1)
    plain(m, opt, crit, x, y, t)


def eval_mode_with_grad(m, opt, crit, x, y, t, k):
    m.eval()
    crit(m(x + 1), y).item()  # a validation loss with grad mode on, never back-propagated
    m.train()
    plain(m, opt, crit, x, y, t)


def metrics_after_backward(m, opt, crit, x, y, t, k):
    opt.zero_grad()
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    (m(x).argmax(1) == y).float().mean().item()  # accuracy on the training batch, grad mode on
    crit(m(x), y).item()
    t.note_grad()
    opt.step()


def input_grad_before(m, opt, crit, x, y, t, k):
    xv = (x + 1).requires_grad_()
    crit(m(xv), y).backward(inputs=[xv])  # a saliency map: no parameter gets a gradient
    plain(m, opt, crit, x, y, t)


def input_grad_after_backward(m, opt, crit, x, y, t, k):
    opt.zero_grad()
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    xv = (x + 1).requires_grad_()
    torch.autograd.grad(crit(m(xv), y), xv)  # between backward and step
    xv.grad = None
    crit(m(xv), y).backward(inputs=[xv])
    t.note_grad()
    opt.step()


def head_only(m, opt, crit, x, y, t, k):
    t.only({"2.weight", "2.bias"})
    opt.zero_grad(set_to_none=k % 2 == 0)  # the body's .grad: None, or zeros
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward(inputs=list(m[2].parameters()))
    t.note_grad()
    opt.step()


def freeze_then_unfreeze(m, opt, crit, x, y, t, k):
    for p in m[0].parameters():
        p.requires_grad_(k >= 2)
    t.pending["trained"] = {n for n, p in m.named_parameters() if p.requires_grad}
    plain(m, opt, crit, x, y, t)


def clip_norm_and_scheduler(m, opt, crit, x, y, t, k):
    opt.zero_grad()
    loss = crit(m(x), y)
    t.note_loss(loss.item())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
    t.note_grad()
    opt.step()
    m._sched.step()


LOOPS = [closure_sgd, eval_no_grad, eval_mode_with_grad, metrics_after_backward, input_grad_before,
         input_grad_after_backward, head_only, freeze_then_unfreeze, clip_norm_and_scheduler]


@pytest.mark.parametrize("body", LOOPS, ids=[f.__name__ for f in LOOPS])
def test_loop_logs_the_brute_force_values(tmp_path, body):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m._sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.7)
    assert body_mismatches(tmp_path, m, opt, crit, body, 5) == []


def test_lr_zero_group(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.0}, {"params": m[2].parameters()}], lr=0.1)
    assert body_mismatches(tmp_path, m, opt, crit, lambda m, opt, crit, x, y, t, k: plain(m, opt, crit, x, y, t), 4) == []


def test_lbfgs_closure(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3)
    assert body_mismatches(tmp_path, m, opt, crit, closure_sgd, 4) == []


# -- a GAN: two optimizers, alternating; the other network's step runs through the watched one -------------
BCE = nn.BCEWithLogitsLoss(reduction="none")


def _frozen_copy(net):
    c = nn.Sequential(*[type(m)(m.in_features, m.out_features) if isinstance(m, nn.Linear) else m for m in net])
    c.load_state_dict(net.state_dict())
    return c.double()


@pytest.mark.parametrize("watch", ["D", "G"])
def test_gan_alternating_steps(tmp_path, watch):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5))
    D = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.05, momentum=0.5)
    crit = nn.BCEWithLogitsLoss()  # one criterion for both losses, as GAN code often has
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(4)]
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)

    def loop(t):
        for real, z in data:
            opt_d.zero_grad()
            fake = G(z)  # the D step back-propagates into G too (no detach): the watched G is not stepped
            if watch == "D":
                g_now = _frozen_copy(G)
                t.begin(lambda m, real=real, z=z, g_now=g_now: torch.cat([
                    BCE(m(real.double()), ones.double()), BCE(m(g_now(z.double())), zeros.double())]).sum(1))
            loss_d = (crit(D(real), ones) + crit(D(fake), zeros)) / 2
            loss_d.backward()
            if watch == "D":
                t.note_loss(loss_d.item())
                t.note_grad()
            opt_d.step()
            if watch == "D":
                t.stepped()
            opt_g.zero_grad()
            if watch == "G":
                d_now = _frozen_copy(D)
                t.begin(lambda m, z=z, d_now=d_now: BCE(d_now(m(z.double())), ones.double()).sum(1))
            loss_g = crit(D(G(z)), ones)  # the G step back-propagates through the watched D: not a D step
            loss_g.backward()
            if watch == "G":
                t.note_loss(loss_g.item())
                t.note_grad()
            opt_g.step()
            if watch == "G":
                t.stepped()

    run, truth = watched(tmp_path, D if watch == "D" else G, opt_d if watch == "D" else opt_g, loop, crit)
    assert mismatches(run, truth, D if watch == "D" else G) == []
    assert not run.skipped


# -- the same samples read twice in one step: not two micro-batches ---------------------------------------
class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.h1, self.h2 = nn.Linear(8, 3), nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x)
        return self.h1(h), self.h2(h)


def retain_graph(m, crit, x, y1, y2):
    a, b = m(x)
    l1, l2 = crit(a, y1), crit(b, y2)
    l1.backward(retain_graph=True)
    l2.backward()
    return l1.item() + l2.item()


def summed(m, crit, x, y1, y2):
    a, b = m(x)
    loss = crit(a, y1) + crit(b, y2)
    loss.backward()
    return loss.item()


def forward_per_loss(m, crit, x, y1, y2):
    l1 = crit(m(x)[0], y1)
    l1.backward()
    l2 = crit(m(x)[1], y2)
    l2.backward()
    return l1.item() + l2.item()


@pytest.mark.parametrize("body", [retain_graph, summed, forward_per_loss], ids=lambda f: f.__name__)
def test_two_losses_on_the_same_batch(tmp_path, body):
    """sample i's loss is l1_i + l2_i: the loss is l1 + l2 over B samples (not their mean over 2B); the
    per-sample quantities cannot separate the two calls' parts: NaN with a reason."""
    m, crit = TwoHeads(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g), torch.randint(0, 3, (4,), generator=g))
            for _ in range(3)]

    def loop(t):
        for x, y1, y2 in data:
            opt.zero_grad()
            t.begin(lambda m64, x=x, y1=y1, y2=y2: CE(m64(x.double())[0], y1) + CE(m64(x.double())[1], y2))
            t.note_loss(body(m, crit, x, y1, y2))
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    rec = next(iter(run))
    assert rec["samples"] == 4
    assert "same samples" in rec["reasons"]["norm_test"]


@pytest.mark.parametrize("split", ["halves", "halves_two_backward", "tail"])
def test_loss_calls_on_row_slices_of_one_output(tmp_path, split):
    """out[:4] and out[4:] of an [8, 3] output are 8 distinct samples; a loss on out[3:] only has 5 samples
    (rows without a loss are not samples of the step)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def loop(t):
        for x, y in batches(3, b=8):
            opt.zero_grad()
            out = m(x)
            if split == "tail":
                t.begin(lambda m64, x=x, y=y: CE(m64(x.double())[3:], y[3:]))
                loss = crit(out[3:], y[3:])
                loss.backward()
                t.note_loss(loss.item())
            else:
                t.begin(ce_of(x, y))
                l1 = crit(out[:4], y[:4])
                if split == "halves_two_backward":
                    (l1 / 2).backward(retain_graph=True)
                l2 = crit(out[4:], y[4:])
                ((l1 + l2) / 2 if split == "halves" else l2 / 2).backward()
                t.note_loss((l1.item() + l2.item()) / 2)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert [r["samples"] for r in run] == [5 if split == "tail" else 8] * 3


def test_gan_both_networks_watched(tmp_path):
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 5))
    D = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    opt_g, opt_d = torch.optim.Adam(G.parameters(), lr=0.01), torch.optim.SGD(D.parameters(), lr=0.05, momentum=0.5)
    crit_d, crit_g = nn.BCEWithLogitsLoss(), nn.BCEWithLogitsLoss()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(4, 5, generator=g), torch.randn(4, 3, generator=g)) for _ in range(4)]
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    t_d, t_g = Truth(D), Truth(G)
    with cockpit_lite.watch(D, opt_d, loss_fn=crit_d, logdir=tmp_path / "D", quantities=QUANTITIES), \
            cockpit_lite.watch(G, opt_g, loss_fn=crit_g, logdir=tmp_path / "G", quantities=QUANTITIES):
        for real, z in data:
            opt_d.zero_grad()
            fake = G(z)
            g_now = _frozen_copy(G)
            t_d.begin(lambda m, real=real, z=z, g_now=g_now: torch.cat([
                BCE(m(real.double()), ones.double()), BCE(m(g_now(z.double())), zeros.double())]).sum(1))
            loss_d = (crit_d(D(real), ones) + crit_d(D(fake), zeros)) / 2  # also back-propagates into G
            loss_d.backward()
            t_d.note_loss(loss_d.item())
            t_d.note_grad()
            opt_d.step()
            t_d.stepped()
            opt_g.zero_grad()
            d_now = _frozen_copy(D)
            t_g.begin(lambda m, z=z, d_now=d_now: BCE(d_now(m(z.double())), ones.double()).sum(1))
            loss_g = crit_g(D(G(z)), ones)
            loss_g.backward()
            t_g.note_loss(loss_g.item())
            t_g.note_grad()
            opt_g.step()
            t_g.stepped()
    for name, net, truth in (("D", D, t_d), ("G", G, t_g)):
        run = cockpit_lite.load(tmp_path / name)
        assert mismatches(run, truth, net) == [], name
        assert not run.skipped, name


class Checkpointed(nn.Module):
    """Every parameter inside one reentrant torch.utils.checkpoint: the outer backward pass writes no .grad,
    the nested one started by the checkpoint does (it is not an input-gradient pass)."""

    def __init__(self, inside):
        super().__init__()
        self.net = mlp()
        self.inside = inside

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.net, x.requires_grad_() if self.inside else x, use_reentrant=True)


@pytest.mark.parametrize("inside", [False, True])
def test_model_inside_one_reentrant_checkpoint(tmp_path, inside):
    """inside: x.requires_grad_() within the checkpointed forward; the captured per-sample sums are then 0 while
    .grad is not (mean_gsnr was logged 0, finite and wrong): NaN with the mean check's reason, never 0."""
    m, crit = Checkpointed(inside), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def loop(t):
        for x, y in batches(3):
            t.begin(lambda m64, x=x, y=y: CE(m64.net(x.double()), y))
            plain(m, opt, crit, x.clone() if inside else x.clone().requires_grad_(), y, t)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert mismatches(run, truth, m) == []
    assert [r["backward_passes"] for r in run] == [1, 1, 1]
    if not inside:
        assert all(isinstance(r["values"]["norm_test"], float) for r in run)
    else:
        for r in run:
            assert "not proportional to .grad" in r["reasons"]["mean_gsnr"], r["reasons"]
            assert not isinstance(r["values"].get("mean_gsnr"), float) or r["values"]["mean_gsnr"] != 0.0
