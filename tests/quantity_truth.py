"""Float64 brute force of every step quantity (brief probe_quant; ``unseen_quantity_models.py`` builds the
loops): ``loop_truth.Truth`` plus what the loop's optimizer did (the lr of each group at the step), and the
brute force of every quantity that ``loop_truth.mismatches`` does not check: param_norm, the per-parameter parts of grad_norm / param_norm /
distance / update_size / mean_gsnr / early_stopping, early_stopping, cabs, lr, grad_hist_1d, grad_hist_2d.

Histograms: the float64 per-sample gradients rounded to float32, binned with the logged edges; an element
within 2e-5 * R of an edge may land in either bin beside it (the fast path computes it in float32).
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from torch import nn

import cockpit_lite
import reference as R
from loop_truth import Truth, mismatches, per_sample_grads, value_problem

ALL = {name: "every" for name in ("loss", "grad_norm", "param_norm", "distance", "update_size", "lr", "cabs",
                                  "early_stopping", "mean_gsnr", "grad_hist_1d", "grad_hist_2d", "alpha",
                                  "norm_test", "inner_test", "ortho_test", "grad_norm_preclip")}
CE = nn.CrossEntropyLoss(reduction="none")


class QTruth(Truth):
    """``Truth`` that also notes the optimizer's groups at each step (call ``note_grad`` right before step)."""

    def __init__(self, model, optimizer, observed=None):
        super().__init__(model, observed)
        self.optimizer = optimizer

    def note_preclip(self, scale: float = 1.0) -> None:
        """||.grad|| / scale right after backward, before the loop clips (or unscales) it."""
        self.pending["preclip"] = float(torch.sqrt(sum(p.grad.double().pow(2).sum() for n, p in self.model.named_parameters()
                                                       if p.grad is not None and n in self.observed))) / scale

    def note_grad(self, scale: float = 1.0) -> None:
        """``scale``: the loss scale still on .grad (GradScaler.step unscales it before the optimizer sees it)."""
        # a parameter the step's backward never reached (.grad None: unused in the forward) is not trained on
        # the step, as for a frozen one (the totals leave it out)
        self.pending["trained"] &= {n for n, p in self.model.named_parameters() if p.grad is not None}
        super().note_grad()
        self.pending["grad"] = [g / scale for g in self.pending["grad"]]
        self.pending["grad_named"] = {n: p.grad.detach().double().clone() / scale for n, p in self.model.named_parameters()
                                      if p.grad is not None and n in self.observed}
        self.pending["lrs"] = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.pending["cabs_ok"] = (type(self.optimizer) is torch.optim.SGD and len(set(self.pending["lrs"])) == 1
                                   and not any(g.get("momentum", 0) for g in self.optimizer.param_groups))


def _close(got, want, tol):
    return abs(got - want) <= tol * max(abs(want), 1e-12)


def _hist_problem(counts, edges_list, values: List[np.ndarray], total: int):
    """None if ``counts`` (nd) are the exact counts of ``values`` (one array per axis) with these edges, except
    that an element within 2e-5 * R of an edge may be counted in either bin beside it."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() != total:
        return f"counts sum to {counts.sum():.0f}, want {total} elements"
    edges = [np.asarray(e, dtype=np.float64) for e in edges_list]
    clipped = [np.clip(v, e[0], e[-1]) for v, e in zip(values, edges)]
    ref, _ = np.histogramdd(np.stack(clipped, 1), bins=edges)
    near = np.zeros(len(clipped[0]), dtype=bool)  # elements within 2e-5 * R of an edge on some axis
    for v, e in zip(clipped, edges):
        band = 2e-5 * max(abs(e[0]), abs(e[-1]))
        i = np.clip(np.searchsorted(e, v), 1, len(e) - 1)
        near |= np.minimum(np.abs(v - e[i]), np.abs(v - e[i - 1])) <= band
    slack = np.zeros_like(ref)
    for axis, e in enumerate(edges):  # every bin such an element could land in
        band = 2e-5 * max(abs(e[0]), abs(e[-1]))
        for shift in (-band, 0.0, band):
            moved = [v[near] for v in clipped]
            moved[axis] = np.clip(moved[axis] + shift, e[0], e[-1])
            slack += np.histogramdd(np.stack(moved, 1), bins=edges)[0]
    off = np.abs(counts - ref)
    if (off > slack).any():
        return f"{off.sum():.0f} counts off the brute force ({slack.sum():.0f} allowed, beside edges)"
    return None


def extra_references(model, truth: QTruth):
    out = []
    names = [n for n, _ in model.named_parameters()]
    for k, st in enumerate(truth.steps):
        losses, G = per_sample_grads(model, st)
        trained = [n for n in names if n in st["trained"]]
        ref = {"early_stopping": R.early_stopping(G)}
        obs = [n for n in names if n in truth.observed]
        ref["param_norm"] = float(torch.sqrt(sum((st["theta"][n].double() ** 2).sum() for n in obs)))
        for n in obs:
            ref[f"param_norm/{n}"] = float(st["theta"][n].double().norm())
            ref[f"distance/{n}"] = float((st["theta"][n].double() - truth.theta0[n].double()).norm())
            ref[f"update_size/{n}"] = float((st["after"][n].double() - st["theta"][n].double()).norm())
        sizes = [st["theta"][n].numel() for n in trained]
        cols = torch.split(G, sizes, dim=1)
        for n, Gp in zip(trained, cols):
            if len(trained) > 1:
                ref[f"mean_gsnr/{n}"] = R.mean_gsnr(Gp)
                ref[f"early_stopping/{n}"] = R.early_stopping(Gp)
        if st.get("grad") is not None:
            ref["grad_norm_preclip"] = st.get("preclip", float(torch.sqrt(sum((g ** 2).sum() for g in st["grad"]))))
        named = st.get("grad_named") or {}
        if len(obs) > 1:
            for n in obs:
                if n in named:
                    ref[f"grad_norm/{n}"] = float(named[n].norm())
        if st.get("lrs") is not None:
            ref["lr"] = st["lrs"][0]
            if len(st["lrs"]) > 1:
                for i, lr in enumerate(st["lrs"]):
                    ref[f"lr/group{i}"] = lr
            if st.get("cabs_ok"):
                ref["cabs"] = R.cabs(G, st["lrs"][0], float(losses.mean()))
        # per parameter: (float32-rounded per-sample gradients, the parameter's values), for the histograms
        ref["_hist"] = {n: (Gp.float().double().numpy().reshape(-1),
                            np.broadcast_to(st["theta"][n].double().reshape(-1).numpy(), Gp.shape).reshape(-1))
                        for n, Gp in zip(trained, cols)}
        out.append(ref)
    return out


def _concat(per_param, left_out, which):
    parts = [v[which] for n, v in per_param.items() if n not in (left_out or {})]
    return np.concatenate(parts) if parts else np.zeros(0)


def all_mismatches(run, truth: QTruth, model, tol=1e-4, skip=(), skipped=(), hists=True) -> List[str]:
    problems = mismatches(run, truth, model, tol=tol, skip=skip, skipped=skipped)
    if problems:
        return problems
    records = {r["step"]: r for r in run}
    numbers = [k for k in range(len(truth.steps) + len(skipped)) if k not in skipped]
    for k, ref in enumerate(extra_references(model, truth)):
        rec = records[numbers[k]]
        for key, want in ref.items():
            if key.startswith("_") or key.split("/")[0] in skip:
                continue
            why = value_problem(k, key, rec["values"].get(key), want, rec, lambda v, want=want: not _close(v, want, tol))
            if why:
                problems.append(why)
        if not hists:
            continue
        data = rec.get("data") or {}
        h1 = data.get("grad_hist_1d")
        if h1 is not None and "grad_hist_1d" not in skip:
            if h1.get("counts") is None:
                if not h1.get("reason"):
                    problems.append(f"step {k}: grad_hist_1d without counts or a reason")
            else:  # parameters left out (with their reasons) are not among the counts
                x = _concat(ref["_hist"], h1.get("excluded"), 0)
                why = _hist_problem(h1["counts"], [h1["edges"]], [x], x.size)
                R = h1["edges"][-1]
                outside = int((np.abs(x) > R * (1 + 2e-5)).sum()), int((np.abs(x) > R * (1 - 2e-5)).sum())
                if not why and h1.get("clipped", 0) >= 0 and not outside[0] <= h1.get("clipped", 0) <= outside[1]:
                    why = f"clipped = {h1.get('clipped')}, {outside[0]} elements outside the range"
                if why:
                    problems.append(f"step {k}: grad_hist_1d {why}")
        h2 = data.get("grad_hist_2d")
        if "grad_hist_2d" not in skip and (h2 is not None or "grad_hist_2d" in rec["values"]):
            if h2 is None or h2.get("counts") is None:
                if not (rec.get("reasons") or {}).get("grad_hist_2d"):
                    problems.append(f"step {k}: grad_hist_2d without counts or a reason")
            else:
                x, y = _concat(ref["_hist"], h2.get("missing"), 0), _concat(ref["_hist"], h2.get("missing"), 1)
                why = _hist_problem(h2["counts"], [h2["x_edges"], h2["y_edges"]], [x, y], x.size)
                if why:
                    problems.append(f"step {k}: grad_hist_2d {why}")
    return problems


def watched(tmp_path, model, opt, loop, crit, quantities=None, observed=None, **options):
    truth = QTruth(model, opt, observed)
    with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities=quantities or ALL,
                            **options):
        loop(truth)
    return cockpit_lite.load(tmp_path / "run"), truth


# -- tiny models, written the way users write them --------------------------------------------------------
def mlp(seed=0, dropout=0.0, bn=False):
    torch.manual_seed(seed)
    mid = [nn.Dropout(dropout)] if dropout else [nn.BatchNorm1d(8)] if bn else []
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), *mid, nn.Linear(8, 3))


def batches(n, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 5, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def ce_of(x, y):
    return lambda m: CE(m(x.double()), y)


