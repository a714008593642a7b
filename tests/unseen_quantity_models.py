"""Builders for the probe of the step quantities (brief probe_quant; ``tests/quantities/test_unseen_quantities.py``):
tiny models and training loops written the way users write them, each returning ``(run, truth, model)`` for
``quantity_truth.all_mismatches`` (the float64 brute force)."""

from __future__ import annotations

import torch
from torch import nn

from loop_truth import plain
from quantity_truth import (ALL, CE, QTruth, all_mismatches, batches, ce_of, extra_references, mlp,  # noqa: F401
                            watched)


OPTIMIZERS = {
    "sgd_momentum_nesterov": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True),
    "sgd_weight_decay": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, weight_decay=0.1),
    "sgd_maximize": lambda m: torch.optim.SGD(m.parameters(), lr=0.01, maximize=True),
    "adam_maximize": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, maximize=True),
    "adamw_decoupled": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, weight_decay=0.5),
    "adamw_fused": lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, fused=True),
    "sgd_fused": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True),
    "adagrad_fused": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1, fused=True),
    "adam_no_foreach": lambda m: torch.optim.Adam(m.parameters(), lr=0.01, foreach=False),
    "adagrad": lambda m: torch.optim.Adagrad(m.parameters(), lr=0.1),
    "rmsprop_momentum": lambda m: torch.optim.RMSprop(m.parameters(), lr=0.01, momentum=0.5),
    "adamax": lambda m: torch.optim.Adamax(m.parameters(), lr=0.05),
    "nadam": lambda m: torch.optim.NAdam(m.parameters(), lr=0.05),
    "radam": lambda m: torch.optim.RAdam(m.parameters(), lr=0.05),
    "sgd_groups_lr0": lambda m: torch.optim.SGD([{"params": m[0].parameters(), "lr": 0.0},
                                                 {"params": m[-1].parameters(), "lr": 0.2}], lr=0.1),
    "sgd_plain_subset": lambda m: torch.optim.SGD(m[-1].parameters(), lr=0.1),
    "sgd_dampening": lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, dampening=0.5),
    "asgd": lambda m: torch.optim.ASGD(m.parameters(), lr=0.05),
    "rprop": lambda m: torch.optim.Rprop(m.parameters(), lr=0.01),
    "adafactor": lambda m: torch.optim.Adafactor(m.parameters(), lr=0.01),
    "adam_tensor_lr_amsgrad": lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01), amsgrad=True),
}


# -- sequence models: a transformer LM with flattened logits, sequence-first GRUs ----------------------------
V, T, D = 7, 5, 8


class LM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.enc = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, V)

    def forward(self, idx):
        return self.head(self.enc(self.emb(idx)))


class TiedLM(LM):
    """The LM with its output layer tied to the embedding (one Parameter in two modules)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight


class GRUSeq(nn.Module):
    """Sequence-first (``[T, B]`` tokens): logits per position (``per_step``) or from the last hidden state."""

    def __init__(self, per_step=True):
        super().__init__()
        self.emb, self.gru = nn.Embedding(V, D), nn.GRU(D, D)
        self.head = nn.Linear(D, V if per_step else 3)
        self.per_step = per_step

    def forward(self, idx):
        h, last = self.gru(self.emb(idx))
        return self.head(h) if self.per_step else self.head(last[0])


def sequence_run(tmp_path, kind, sizes, ignore=False, steps=3):
    """``kind``: "lm" (batch-first, logits.view(-1, V)), "lm_tied" (its head tied to the embedding), "gru_step" (sequence-first, logits per position,
    flattened), "gru_last" (sequence-first, a class from the last hidden state). Micro-batches of ``sizes``
    sequences, each loss weighted by its share of the sequences; ``ignore``: -100 targets (the first two
    positions, all of the first sequence). l_i = n_k * (sample i's token losses) / (counted tokens of its
    micro-batch): the mean over a micro-batch's samples is its loss."""
    torch.manual_seed(0)
    seq_first = kind.startswith("gru")
    m = LM() if kind == "lm" else TiedLM() if kind == "lm_tied" else GRUSeq(per_step=kind == "gru_step")
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)

    def make(b):
        x = torch.randint(0, V, (b, T), generator=g)
        if kind == "gru_last":
            return x.T.contiguous(), torch.randint(0, 3, (b,), generator=g)
        y = torch.randint(0, V, (b, T), generator=g)
        if ignore:
            y[:, :2] = -100
            y[0] = -100
        return (x.T.contiguous(), y.T.contiguous()) if seq_first else (x, y)

    def per_sample(m64, mbs):
        out = []
        for x, y in mbs:
            o = m64(x)
            if kind == "gru_last":
                out.append(CE(o, y))
                continue
            ce = nn.CrossEntropyLoss(reduction="none")(o.reshape(-1, V), y.reshape(-1)).view(*y.shape)
            ce = ce.T if seq_first else ce
            out.append(ce.shape[0] * ce.sum(1) / (y != -100).sum())
        return torch.cat(out)

    def loop(t):
        for _ in range(steps):
            mbs = [make(s) for s in sizes]
            t.begin(lambda m64, mbs=mbs: per_sample(m64, mbs))
            opt.zero_grad()
            total = 0.0
            for (x, y), b in zip(mbs, sizes):
                o = m(x)
                loss = crit(o, y) if kind == "gru_last" else crit(o.view(-1, V), y.view(-1))
                (loss * b / sum(sizes)).backward()
                total += loss.item() * b
            t.note_loss(total / sum(sizes))
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def _record_dropout_mask(mod, inputs, output):
    mod.mask = (output != 0).double() / (1 - mod.p)


def step_setup_run(tmp_path, name, steps=5):
    """SGD with momentum on the MLP under one of the set-ups where alpha / update_size are most likely wrong:
    clip, scaler, sum, accumulation (unequal micro-batches), dropout, bn_train, bn_eval, lbfgs, scheduler."""
    crit = nn.CrossEntropyLoss(reduction="sum" if name.startswith("sum") else "mean")
    m = mlp(dropout=0.3 if name == "dropout" else 0.0, bn=name.startswith("bn"))
    if name == "bn_eval":
        m.eval()
    if name == "dropout":  # the brute force reuses the step's mask (the end point of alpha: step t+1's own)
        m[2].register_forward_hook(_record_dropout_mask)
    opt = (torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=3) if name == "lbfgs"
           else torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=20) if name == "scheduler" else None
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if name.startswith("scaler") else None
    g = torch.Generator().manual_seed(7)

    def loop(t):
        for k, (x, y) in enumerate(batches(steps)):
            if name in ("accumulation", "sum_accumulation"):
                sizes = [3, 2, 1] if k % 2 == 0 else [4, 2]
                mbs = [(torch.randn(s, 5, generator=g), torch.randint(0, 3, (s,), generator=g)) for s in sizes]
                t.begin(lambda m64, mbs=mbs: torch.cat([CE(m64(a.double()), b) for a, b in mbs]))
                opt.zero_grad()
                total = 0.0
                for a, b in mbs:
                    loss = crit(m(a), b)
                    if name == "sum_accumulation":  # per-sample losses: the CE of each sample; the loss: their sum
                        loss.backward()
                        total += loss.item()
                    else:
                        (loss * len(b) / sum(sizes)).backward()
                        total += loss.item() * len(b) / sum(sizes)
                t.note_loss(total)
                t.note_grad()
                opt.step()
            elif name == "lbfgs":
                t.begin(ce_of(x, y))

                def closure(x=x, y=y):
                    opt.zero_grad()
                    loss = crit(m(x), y)
                    loss.backward()
                    if "grad" not in t.pending:
                        t.note_loss(loss.item())
                        t.note_grad()
                    return loss
                opt.step(closure)
            else:
                t.begin(ce_of(x, y))
                opt.zero_grad()
                loss = crit(m(x), y)
                if name == "dropout":
                    t.pending["per_sample"] = (lambda m64, x=x, y=y, mask=m[2].mask:
                                               CE(m64[3](m64[1](m64[0](x.double())) * mask), y))
                t.note_loss(loss.item())
                if scaler is not None:
                    scaler.scale(loss).backward()
                    t.note_preclip(scaler.get_scale())
                    if name == "scaler":  # else scaler.step unscales
                        scaler.unscale_(opt)
                    t.note_grad(1.0 if name == "scaler" else scaler.get_scale())
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    t.note_preclip()
                    if name == "clip":
                        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.3)
                    t.note_grad()
                    opt.step()
                if sched is not None:
                    sched.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


STEP_SETUPS = ["clip", "scaler", "scaler_implicit_unscale", "sum", "sum_accumulation", "accumulation", "dropout", "bn_train", "bn_eval", "lbfgs", "scheduler"]


# -- parameters whose per-sample gradients are all zero, or that get none; a CNN with growing inputs ---------
class Zeroed(nn.Module):
    """``extra``: reached by backward, every per-sample gradient exactly 0 (g = 0, m2 = 0: 0/0 in the noise
    ratios); ``unused``: never called (.grad None: not trained on the step)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.extra, self.unused = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + 0.0 * self.extra(x)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c, self.f = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(48, 3)

    def forward(self, x):
        return self.f(torch.relu(self.c(x)).flatten(1))


class PoolCNN(nn.Module):
    """Small inputs, near-equal logits: the output bias's per-sample gradients (the softmax) agree to 1e-3,
    its GSNR is ~1e4 on an element (the variance cancels in float32: ``_snr_resolution.py``)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c, self.f = nn.Conv2d(2, 3, 3, padding=1), nn.Linear(3, 3)

    def forward(self, x):
        return self.f(torch.tanh(self.c(x)).mean((2, 3)) * 0.1)


def model_run(tmp_path, name):
    """"zeroed" (SGD), "zeroed_frozen_adam" (Adam, a.weight frozen), "cnn" (inputs growing 1x..10x, so the
    histogram range of the conv layer, taken from the previous step, is exceeded), "agreeing" (PoolCNN)."""
    crit = nn.CrossEntropyLoss()
    if name == "agreeing":
        m, g = PoolCNN(), torch.Generator().manual_seed(3)
        data = [(torch.randn(6, 2, 4, 4, generator=g) * 0.1 * (1 + 5 * k), torch.randint(0, 3, (6,), generator=g))
                for k in range(4)]
    elif name == "cnn":
        m, g = SmallCNN(), torch.Generator().manual_seed(3)
        data = [(torch.randn(6, 2, 4, 4, generator=g) * (1 + 3 * k), torch.randint(0, 3, (6,), generator=g))
                for k in range(4)]
    else:
        m, data = Zeroed(), batches(4)
    if name.endswith("frozen_adam"):
        m.a.weight.requires_grad_(False)
    opt = (torch.optim.Adam(m.parameters(), lr=0.01) if name.endswith("adam")
           else torch.optim.SGD(m.parameters(), lr=0.1))

    def loop(t):
        for x, y in data:
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


class DropoutLM(LM):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, dropout=0.2, batch_first=True)


def dropout_lm_run(tmp_path, sizes=(5,), steps=3):
    """A transformer LM with dropout 0.2 (attention, feed-forward, residual) in training: the brute force
    draws the step's masks again (the same seed before the forward: float32 and float64 draw the same
    masks). Attention's per-sample values are NaN (its dropout), the other layers' must be exact."""
    torch.manual_seed(0)
    m, crit = DropoutLM(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)

    def loop(t):
        for k in range(steps):
            mbs = [(torch.randint(0, V, (b, T), generator=g), torch.randint(0, V, (b, T), generator=g), 100 * k + j)
                   for j, b in enumerate(sizes)]

            def per_sample(m64, mbs=mbs):
                out = []
                for x, y, seed in mbs:
                    torch.manual_seed(seed)
                    out.append(CE(m64(x).reshape(-1, V), y.reshape(-1)).view(*y.shape).mean(1))
                return torch.cat(out)
            t.begin(per_sample)
            opt.zero_grad()
            total = 0.0
            for x, y, seed in mbs:
                torch.manual_seed(seed)
                loss = crit(m(x).view(-1, V), y.view(-1))
                (loss * len(x) / sum(sizes)).backward()
                total += loss.item() * len(x) / sum(sizes)
            t.note_loss(total)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def agreeing_run(tmp_path, spread, steps=3):
    """The MLP on 6 inputs that differ by ``spread`` around one point, all of class 1: the samples' gradients
    agree, every variance the noise statistics estimate cancels in float32 (``_resolution.cancellation``)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 5, generator=g)
    data = [(base + spread * torch.randn(6, 5, generator=g), torch.full((6,), 1)) for _ in range(steps)]

    def loop(t):
        for x, y in data:
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def modified_after_step_run(tmp_path, how, steps=5):
    """The loop changes the parameters in place after ``optimizer.step()``: "clamp" (WGAN weight clipping),
    "renorm" (a max-norm projection of the first layer's rows, active on some steps only)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)

    def loop(t):
        for x, y in batches(steps):
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            with torch.no_grad():
                if how == "clamp":
                    for p in m.parameters():
                        p.clamp_(-0.3, 0.3)
                else:
                    m[0].weight.div_(m[0].weight.norm(dim=1, keepdim=True).clamp(min=1.0))
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def _loss_modules(name):
    pw = torch.tensor([1.0, 2.0, 3.0, 0.5])
    return {"mse": (nn.MSELoss(), nn.MSELoss(reduction="none")),
            "huber": (nn.HuberLoss(delta=0.5), nn.HuberLoss(delta=0.5, reduction="none")),
            "bce_pos_weight": (nn.BCEWithLogitsLoss(pos_weight=pw),
                               nn.BCEWithLogitsLoss(pos_weight=pw.double(), reduction="none")),
            "l1": (nn.L1Loss(), nn.L1Loss(reduction="none"))}[name]


def regression_run(tmp_path, name, sizes=(4, 2), steps=3):
    """A 4-output MLP under an elementwise loss module (mean over B x 4), micro-batches of unequal sizes:
    l_i = the mean of sample i's 4 elements."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4))
    crit, none = _loss_modules(name)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(2)

    def target(b):
        return (torch.rand(b, 4, generator=g) > 0.5).float() if name.startswith("bce") else torch.randn(b, 4, generator=g)

    def loop(t):
        for _ in range(steps):
            mbs = [(torch.randn(b, 5, generator=g), target(b)) for b in sizes]
            t.begin(lambda m64, mbs=mbs: torch.cat([none(m64(x.double()), y.double()).mean(1) for x, y in mbs]))
            opt.zero_grad()
            total = 0.0
            for x, y in mbs:
                loss = crit(m(x), y)
                (loss * len(x) / sum(sizes)).backward()
                total += loss.item() * len(x) / sum(sizes)
            t.note_loss(total)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def hf_style_run(tmp_path, reduction="mean", steps=4, sizes=(3, 2)):
    """The loop most fine-tuning scripts write: AdamW with a no-decay group for biases/norms, linear warm-up
    stepped every batch, GradScaler, accumulation over unequal micro-batches, unscale_ + clip_grad_norm_."""
    torch.manual_seed(0)
    m = LM()
    crit = nn.CrossEntropyLoss(reduction=reduction)
    opt = torch.optim.AdamW([{"params": [p for p in m.parameters() if p.dim() > 1], "weight_decay": 0.1},
                             {"params": [p for p in m.parameters() if p.dim() <= 1], "weight_decay": 0.0}], lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    g = torch.Generator().manual_seed(3)
    reduce = (lambda ce: ce.sum(1)) if reduction == "sum" else (lambda ce: ce.mean(1))

    def loop(t):
        for _ in range(steps):
            mbs = [(torch.randint(0, V, (b, T), generator=g), torch.randint(0, V, (b, T), generator=g)) for b in sizes]
            t.begin(lambda m64, mbs=mbs: torch.cat([reduce(CE(m64(x).reshape(-1, V), y.reshape(-1)).view(*y.shape))
                                                    for x, y in mbs]))
            opt.zero_grad()
            total = 0.0
            for x, y in mbs:
                loss = crit(m(x).view(-1, V), y.view(-1))
                w = 1.0 if reduction == "sum" else len(x) / sum(sizes)
                scaler.scale(loss * w).backward()
                total += loss.item() * w
            t.note_preclip(scaler.get_scale())
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5)
            t.note_loss(total)
            t.note_grad()
            scaler.step(opt)
            scaler.update()
            sched.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m


def cnn_zoo_run(tmp_path, steps=4):
    """Conv + GroupNorm, a grouped strided conv, BatchNorm2d in eval mode, Dropout2d in training (its masks
    drawn again by seed in the brute force), label smoothing, SGD with momentum."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.BatchNorm2d(4), nn.Dropout2d(0.3),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    m[4].eval()
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    none = nn.CrossEntropyLoss(label_smoothing=0.1, reduction="none")
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)

    def loop(t):
        for k in range(steps):
            x, y = torch.randn(6, 2, 6, 6, generator=g), torch.randint(0, 3, (6,), generator=g)

            def per_sample(m64, x=x, y=y, seed=50 + k):
                torch.manual_seed(seed)
                return none(m64(x.double()), y)
            t.begin(per_sample)
            opt.zero_grad()
            torch.manual_seed(50 + k)
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            loss.backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    return run, truth, m
