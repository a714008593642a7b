"""How close cockpit-lite is to the floor under the issues' speed targets, on the MLP problem.

    python benchmarks/floor.py [--rounds 9] [--steps 10] [--cnn]

For three sets of quantities tracked every step, a *minimal* version is written here by hand and
timed side by side with the plain step and with cockpit-lite (interleaved in one process,
``benchmarks/timing.py``; median over rounds of the ratio to the plain step of the same round):

* ``first-order`` (issue 2's ``default`` preset): before the step a snapshot of the parameters and the
  norms of the gradients, of the parameters and of their distance from the initial ones; after it the
  size of the update; per tensor (multi-tensor kernels), and one JSON line per step.
* ``noise`` (issue 3: grad_norm, norm/inner/ortho tests, mean GSNR): per Linear layer from its input A
  and output gradient D (hooks), ||g_i||^2 = ||a_i||^2 ||d_i||^2, sum_i g_i^2 = (D^2)^T A^2 (one GEMM) and
  g_i . g = rowsum((A g^T) * D) (one GEMM); the statistics as multi-tensor kernels; one JSON line.
* ``alpha`` (issue 4): the per-sample losses from the logits, the projections g_i . d on the previous
  update (step t, one GEMM per layer before the step) and on this step's update (after it, one GEMM
  per layer), the quadratic fit (``cockpit_lite.alpha_fit``); one JSON line.

On the CNN (``--cnn``) no minimal version is written; instead the arithmetic floor of the per-sample
statistics is measured directly: per conv layer, the time of the ordinary (batched) weight gradient,
a lower bound for building the B per-sample weight gradients, which sum_i g_i^2 needs (no factored
form exists for convolutions), against cockpit-lite's per-sample blocks and its fused statistics
(||g_i||^2, sum_i g_i^2, g_i . g) on the same layer inputs and output gradients. alpha's projections
g_i . d go either through the per-sample blocks or through one forward convolution of the inputs with
d (``ConvWeightSamples.dots`` takes the faster); two per step, so twice the cheaper kernel is its floor.

The minimal versions know the model (three Linear layers, one micro-batch, a mean loss, one process)
and check nothing: no NaN reasons, no per-sample self-check, no handling of accumulation, AMP, DDP,
other layers or failures. They are a floor for what cockpit-lite computes, not a replacement. The
GEMMs they add are the arithmetic the statistics need; the rest of their cost is the per-step Python
and elementwise work any implementation pays.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import problems, timing  # noqa: E402
from cockpit_lite.alpha_fit import fit_alpha  # noqa: E402

SETS = {
    "first-order": "default",
    "noise": ["grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr"],
    "alpha": ["alpha"],
}
TARGETS = {("first-order", "sgd"): 1.05, ("first-order", "adam"): 1.05, ("noise", "sgd"): 2.0,
           ("alpha", "sgd"): 1.4, ("alpha", "adam"): 1.4}


class _Minimal:
    """One training loop on the MLP with one set computed by hand (see the module docstring)."""

    def __init__(self, problem, kind: str, optimizer: str, logfile, momentum: float = 0.0):
        torch.manual_seed(0)
        self.model = problem.make_model()
        self.linears = [m for m in self.model if isinstance(m, nn.Linear)]
        if any(not isinstance(m, (nn.Linear, nn.ReLU, nn.Flatten)) for m in self.model):
            raise SystemExit("benchmarks/floor.py: the minimal versions handle Linear/ReLU/Flatten models only")
        self.opt = problems.make_optimizer(self.model, optimizer, momentum=momentum)
        self.crit = nn.CrossEntropyLoss()
        self.params = list(self.model.parameters())
        self.kind = kind
        self.fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        self.step_no = 0
        self.io = {}
        with torch.no_grad():
            self.theta0 = [p.detach().clone() for p in self.params]
            self.before = [torch.empty_like(p) for p in self.params]
        self.prev = None  # alpha: (unit update, f0, var f0, df0, var df0, t) of the previous step
        if kind in ("noise", "alpha"):
            for m in self.linears:
                m.register_forward_hook(self._keep_io)
        batches = [problem.make_batch(s, problem.batch_size) for s in range(4)]
        self.batches = batches

    def _keep_io(self, module, inputs, output):
        slot = self.io[module] = [inputs[0].detach(), None]

        def keep_grad(g):
            slot[1] = g.detach()
        output.register_hook(keep_grad)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _write(self, values):
        os.write(self.fd, (json.dumps({"type": "step", "step": self.step_no, "wall": time.time(),
                                       "values": values}) + "\n").encode())

    def __call__(self):
        t0 = time.perf_counter()
        x, y = self.batches[self.step_no % 4]
        self.opt.zero_grad()
        out = self.model(x)
        loss = self.crit(out, y)
        loss.backward()
        values = getattr(self, "_" + self.kind.replace("-", "_"))(out, y, loss)
        values["time"] = time.perf_counter() - t0
        self._write(values)
        self.step_no += 1

    def _first_order(self, out, y, loss):
        grads = [p.grad for p in self.params]
        with torch.no_grad():  # norms of theta_t and theta_t - theta_0 (before the step), then of the update
            torch._foreach_copy_(self.before, self.params)
            before = torch._foreach_norm(grads) + torch._foreach_norm(self.params) + torch._foreach_norm(
                torch._foreach_sub(self.params, self.theta0))
            self.opt.step()
            norms = torch.stack(before + torch._foreach_norm(torch._foreach_sub(self.params, self.before)))
            k = len(self.params)
            totals = norms.reshape(4, k).double().pow(2).sum(1).sqrt()
            per, tot = norms.tolist(), totals.tolist()
        values = {"loss": loss.item(), "lr": self.opt.param_groups[0]["lr"]}
        for q, name in enumerate(("grad_norm", "param_norm", "distance", "update_size")):
            values[name] = tot[q]
            for j in range(k):
                values[f"{name}/{j}"] = per[q * k + j]
        return values

    def _noise(self, out, y, loss):
        n = out.shape[0]
        sq, dots, m2s = [], [], []
        with torch.no_grad():
            for m in self.linears:
                A, D = self.io[m]
                D = D * n  # per-sample loss gradients (mean reduction)
                A2, D2 = A * A, D * D
                d2 = D2.sum(1)
                sq += [A2.sum(1) * d2, d2]
                m2s += [D2.T @ A2, D2.sum(0)]
                dots += [((A @ m.weight.grad.T) * D).sum(1), D @ m.bias.grad]
            grads = [g for m in self.linears for g in (m.weight.grad, m.bias.grad)]
            gg = torch.stack(torch._foreach_norm(grads)).double() ** 2
            sqs = torch.stack(sq).double().sum(1)
            P = torch.stack(dots).double()
            p2, p2t = (P * P).sum(1), (P.sum(0) ** 2).sum()
            v = torch._foreach_mul(m2s, 1.0 / n)
            torch._foreach_addcmul_(v, grads, grads, value=-1.0)
            torch._foreach_add_(v, 1e-5)
            r = torch._foreach_div(grads, v)
            torch._foreach_mul_(r, grads)
            snr = torch.stack([t.sum() for t in r]).double()
            counts = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
            gg, sqs, p2 = (torch.cat([x, x.sum()[None]]) for x in (gg, sqs, p2))  # per tensor, then the total
            p2[-1] = p2t
            norm_test = ((sqs / gg - n) / (n * (n - 1))).clamp(min=0).sqrt()
            inner = ((p2 - n * gg * gg) / (n - 1) / (n * gg * gg)).clamp(min=0).sqrt()
            ortho = ((sqs - p2 / gg) / (n - 1) / (n * gg)).clamp(min=0).sqrt()
            gsnr = torch.cat([snr / counts, (snr.sum() / counts.sum())[None]])
            rows = torch.stack([gg.sqrt(), norm_test, inner, ortho, gsnr]).tolist()
            self.opt.step()
        values = {"loss": loss.item()}
        for name, row in zip(("grad_norm", "norm_test", "inner_test", "ortho_test", "mean_gsnr"), rows):
            values[name] = row[-1]
            for j, x in enumerate(row[:-1]):
                values[f"{name}/{j}"] = x
        return values

    def _projections(self, unit):
        """[n] g_i . unit (unit: one tensor per parameter, weight and bias of each layer)."""
        n = next(iter(self.io.values()))[0].shape[0]
        total = None
        for k, m in enumerate(self.linears):
            A, D = self.io[m]
            D = D * n
            p = ((A @ unit[2 * k].T) * D).sum(1) + D @ unit[2 * k + 1]
            total = p if total is None else total + p
        return total

    def _alpha(self, out, y, loss):
        values = {"loss": loss.item()}
        with torch.no_grad():
            losses = F.cross_entropy(out.detach(), y, reduction="none")
            if self.prev is not None:  # the far end of the previous step, on this batch
                unit, f0, vf0, df0, vdf0, t = self.prev
                p = self._projections(unit)
                stats = torch.stack([losses.mean(), losses.var(), p.mean(), p.var()]).tolist()
                fit = fit_alpha(t, f0, stats[0], df0, stats[2], vf0, stats[1], vdf0, stats[3])
                values["alpha_prev"] = fit.alpha
            torch._foreach_copy_(self.before, self.params)
            self.opt.step()
            d = torch._foreach_sub(self.params, self.before)
            t = float(torch.stack(torch._foreach_norm(d)).norm())
            unit = torch._foreach_div(d, t) if t > 0 else d
            p = self._projections(unit)
            stats = torch.stack([losses.mean(), losses.var(), p.mean(), p.var()]).tolist()
            self.prev = (unit, stats[0], stats[1], stats[2], stats[3], t)
        return values


def _cockpit_step(problem, kind, optimizer, logdir):
    """(step, cockpit): the usual loop with cockpit-lite tracking ``kind``'s set, from the same seed and
    batches as the minimal versions (``problems.training_step``)."""
    step, cp, _ = problems.training_step(problem, SETS[kind], logdir, optimizer=optimizer, momentum=0.0)
    return step, cp


def _plain_step(problem, optimizer):
    return problems.training_step(problem, None, None, optimizer=optimizer, momentum=0.0)[0]


def measure(rounds: int, steps: int, cases=(("first-order", "sgd"), ("noise", "sgd"), ("alpha", "sgd"),
                                              ("first-order", "adam"), ("alpha", "adam"))):
    """{(set, optimizer): {"plain": ms, "minimal": ms, "cockpit-lite": ms, "minimal_ratio": x, "ratio": x}}."""
    problem = problems.get("mlp")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for opt_name in sorted({o for _, o in cases}, reverse=True):
            variants, closers = {"plain": _plain_step(problem, opt_name)}, []
            for kind, o in cases:
                if o != opt_name:
                    continue
                minimal = _Minimal(problem, kind, o, os.path.join(tmp, f"minimal-{kind}-{o}.jsonl"))
                variants[f"{kind}:minimal"] = minimal
                closers.append(minimal.close)
                variants[f"{kind}:cockpit-lite"], cp = _cockpit_step(problem, kind, o, os.path.join(tmp, f"{kind}-{o}"))
                closers.append(cp.close)
            per_round = timing.interleaved(variants, rounds=rounds, steps=steps)
            for close in closers:
                close()
            ms, ratios = timing.medians(per_round), timing.ratios(per_round)
            for kind, o in cases:
                if o == opt_name:
                    out[(kind, o)] = {"plain": ms["plain"] * 1e3, "minimal": ms[f"{kind}:minimal"] * 1e3,
                                      "cockpit-lite": ms[f"{kind}:cockpit-lite"] * 1e3,
                                      "minimal_ratio": ratios[f"{kind}:minimal"],
                                      "ratio": ratios[f"{kind}:cockpit-lite"]}
    return out


def check(steps: int = 4) -> dict:
    """{quantity: largest relative difference} between the minimal versions and cockpit-lite over
    ``steps`` steps of the same training (same seed and batches, SGD and Adam): the minimal versions
    must compute the same numbers to be a floor for them."""
    import cockpit_lite

    problem = problems.get("mlp")
    worst = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, o in (("first-order", "sgd"), ("noise", "sgd"), ("alpha", "sgd"), ("alpha", "adam")):
            path = os.path.join(tmp, f"minimal-{kind}-{o}.jsonl")
            minimal = _Minimal(problem, kind, o, path)
            step, cp = _cockpit_step(problem, kind, o, os.path.join(tmp, f"{kind}-{o}"))
            for _ in range(steps):
                minimal()
                step()
            minimal.close()
            cp.close()
            with open(path) as f:
                mine = [json.loads(line)["values"] for line in f]
            run = cockpit_lite.load(os.path.join(tmp, f"{kind}-{o}"))
            names = (["alpha"] if kind == "alpha" else
                     [n for n in mine[0] if "/" not in n and n not in ("time", "lr", "loss")])
            for name in names:
                got = {int(s_): float(v) for s_, v in zip(*run.series(name))}
                for k, values in enumerate(mine):
                    step_no, key = (k - 1, "alpha_prev") if name == "alpha" else (k, name)
                    if key not in values or step_no not in got:
                        continue
                    a, b = values[key], got[step_no]
                    rel = abs(a - b) / max(abs(b), 1e-12)
                    worst[name] = max(worst.get(name, 0.0), rel)
    return worst


def conv_floor(repeats: int = 5) -> dict:
    """Per conv layer of the CNN problem, ms: the batched weight gradient (the floor), cockpit-lite's
    per-sample blocks, and its fused statistics; and the plain step (forward + backward)."""
    from cockpit_lite.persample.conv import ConvWeightSamples

    problem = problems.get("cnn")
    torch.manual_seed(0)
    model, crit = problem.make_model(), nn.CrossEntropyLoss()
    x, y = problem.make_batch(0, problem.batch_size)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    io = {}

    def keep(module, inputs, output):
        slot = io[module] = [inputs[0].detach(), None]
        output.register_hook(lambda g: slot.__setitem__(1, g.detach()))
    for m in convs:
        m.register_forward_hook(keep)

    def ms(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats * 1e3

    out = {"plain": ms(lambda: crit(model(x), y).backward()), "layers": []}
    for m in convs:
        X, D = io[m]
        blocks = ConvWeightSamples(m, X.contiguous(), D.contiguous())
        v = torch.randn_like(m.weight)
        out["layers"].append({
            "layer": f"{m.in_channels}->{m.out_channels}, {X.shape[-2]}x{X.shape[-1]}",
            "weight_grad": ms(lambda: torch.ops.aten.convolution_backward(
                D, X, m.weight.detach(), None, list(m.stride), list(m.padding), list(m.dilation), False,
                [0] * (X.dim() - 2), m.groups, [False, True, False])),
            "forward": ms(lambda: torch.nn.functional.conv2d(X, v, None, m.stride, m.padding, m.dilation, m.groups)),
            "blocks": ms(lambda: list(blocks._raw_chunks())),
            "method": blocks.method(),
            "fused": ms(lambda: blocks.fused_stats({"sq", "m2", "dots"}, v)),
        })
    return out


def conv_table(r) -> str:
    lines = [f"CNN plain step (forward + backward): {r['plain']:.1f} ms",
             "| conv layer | batched weight gradient ms (noise floor) | forward conv ms | per-sample blocks ms (method) "
             "| blocks + statistics ms |", "| --- | --- | --- | --- | --- |"]
    for x in r["layers"]:
        lines.append(f"| {x['layer']} | {x['weight_grad']:.1f} | {x['forward']:.1f} | {x['blocks']:.1f} ({x['method']}) "
                     f"| {x['fused']:.1f} |")
    tot = {k: sum(x[k] for x in r["layers"]) for k in ("weight_grad", "forward", "blocks", "fused")}
    lines.append(f"| all | {tot['weight_grad']:.1f} ({tot['weight_grad'] / r['plain']:.2f}x plain) | {tot['forward']:.1f} "
                 f"| {tot['blocks']:.1f} | {tot['fused']:.1f} ({tot['fused'] / r['plain']:.2f}x plain) |")
    proj = 2 * sum(min(x["weight_grad"], x["forward"]) for x in r["layers"])
    lines.append(f"alpha's two projections per conv layer, each through the cheaper of the two kernels: "
                 f"{proj:.1f} ms ({proj / r['plain']:.2f}x plain)")
    return "\n".join(lines)


def table(results) -> str:
    lines = ["| set (MLP, every step) | optimizer | plain ms | minimal by hand (x plain) | cockpit-lite (x plain) "
             "| target |", "| --- | --- | --- | --- | --- | --- |"]
    for (kind, o), r in results.items():
        lines.append(f"| {kind} | {o} | {r['plain']:.1f} | {r['minimal']:.1f} ({r['minimal_ratio']:.2f}x) "
                     f"| {r['cockpit-lite']:.1f} ({r['ratio']:.2f}x) | <= {TARGETS[(kind, o)]}x |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cnn", action="store_true", help="also the per-layer floor of the CNN's per-sample statistics")
    args = ap.parse_args(argv)
    worst = check()
    print("minimal versions vs cockpit-lite, largest relative difference over 4 steps: "
          + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    if max(worst.values()) > 1e-3:
        raise SystemExit("benchmarks/floor.py: a minimal version computes other numbers than cockpit-lite")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.steps} steps")
    print(table(measure(args.rounds, args.steps)))
    if args.cnn:
        print(conv_table(conv_floor()))


if __name__ == "__main__":
    main()
