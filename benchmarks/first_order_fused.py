"""The first-order set every step on the MLP (784-256-128-10, B=128): its ratio to a plain step (issue 21 item 2).

    python benchmarks/first_order_fused.py                         # this checkout
    python benchmarks/first_order_fused.py --code /tmp/before      # another checkout (e.g. ``git archive``)
    python benchmarks/first_order_fused.py --compare /tmp/before   # both, in alternating processes

Each process times the plain loop and the watched loop interleaved (``benchmarks/timing.py``: ratio
per round, median over rounds), in CPU time of the process (``time.process_time``, one thread), which
the other load of a shared machine disturbs less than wall time. ``--compare`` alternates processes of the two checkouts (``--pairs``
of them) so that both see the same machine load, and prints the two medians side by side. A run takes
about 20-40 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_interleaved(variants, rounds: int, steps: int, warmup: int = 10):
    """``timing.interleaved`` in CPU seconds of this process (one thread): the other load of a shared
    machine counts less than in wall time (the batched log's flush thread is counted too)."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    per_round = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.process_time()
            for _ in range(steps):
                variants[name]()
            per_round[name].append((time.process_time() - t0) / steps)
    return per_round


def tensor_work_step(problem):
    """The plain step (SGD with momentum, as ``problems.training_step``) plus exactly the tensor work the
    fused first-order set does, and nothing else (no hooks, no records): the gradient norms at the end of
    backward (grad_norm_preclip), the snapshot of theta_t, theta_t - theta_0, one norm reduction over the
    gradients, the parameters and that difference, the update and its norms, one host transfer."""
    import itertools

    from torch import nn

    from benchmarks import problems
    from cockpit_lite.norm_batch import norms_on_device

    torch.manual_seed(0)
    model = problem.make_model()
    opt = problems.make_optimizer(model, "sgd", 0.9)
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    with torch.no_grad():
        theta0 = [p.detach().clone() for p in params]
        before = [torch.empty_like(p) for p in params]
        scratch = [torch.empty_like(p) for p in params]
    batches = itertools.cycle([problem.make_batch(s, problem.batch_size) for s in range(4)])

    def step():
        x, y = next(batches)
        opt.zero_grad()
        loss = crit(model(x), y)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in params]
            at_backward_end = norms_on_device(grads)
            torch._foreach_copy_(before, params)
            torch._foreach_copy_(scratch, params)
            torch._foreach_sub_(scratch, theta0)
            pre = norms_on_device(grads + params + scratch)
            opt.step()
            torch._foreach_sub_(before, params)
            post = norms_on_device(before)
            torch.cat([at_backward_end, pre, post, loss.detach().reshape(1)]).tolist()

    return step


def measure(rounds: int, steps: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    from benchmarks import problems, timing
    from cockpit_lite import presets

    from benchmarks import floor

    problem = problems.get("mlp")
    with tempfile.TemporaryDirectory() as logdir:
        watched, cockpit, _ = problems.training_step(problem, presets.preset("default"), logdir=logdir)
        plain, _, _ = problems.training_step(problem)
        # the hand-written minimum of benchmarks/floor.py (without grad_norm_preclip), with its own plain step
        # (SGD without momentum, as it uses)
        minimal = floor._Minimal(problem, "first-order", "sgd", os.path.join(logdir, "floor.jsonl"))
        plain0 = floor._plain_step(problem, "sgd")
        variants = {"plain": plain, "first-order": watched, "plain0": plain0, "floor": minimal}
        try:
            variants["tensor work"] = tensor_work_step(problem)
        except ImportError:  # a checkout without cockpit_lite.norm_batch
            pass
        per_round = cpu_interleaved(variants, rounds, steps)
        cockpit.close()
        minimal.close()
    med = timing.medians(per_round)
    ratios = timing.ratios(per_round)
    return {"ratio": ratios["first-order"], "plain_ms": med["plain"] * 1e3, "watched_ms": med["first-order"] * 1e3,
            "floor": timing.ratios(per_round, "plain0")["floor"], "tensor_work": ratios.get("tensor work")}


def run_in(code: str, rounds: int, steps: int, threads: int) -> dict:
    """``measure`` in a fresh process importing cockpit_lite (and these benchmarks) from ``code``."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(code), OMP_NUM_THREADS=str(threads))
    script = (f"import sys, json, importlib.util; sys.path.insert(0, {os.path.abspath(code)!r});"
              f"spec = importlib.util.spec_from_file_location('fof', {os.path.abspath(__file__)!r});"
              f"mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod); measure = mod.measure;"
              f"import cockpit_lite;"
              f"assert cockpit_lite.__file__.startswith({os.path.abspath(code)!r}), cockpit_lite.__file__;"
              f"print(json.dumps(measure({rounds}, {steps}, {threads})))")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True,
                         cwd=tempfile.gettempdir())
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code", default=HERE, help="checkout whose cockpit_lite is timed")
    parser.add_argument("--compare", default=None, help="a second checkout, timed in alternating processes")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    labels = {"this": args.code} if args.compare is None else {"before": args.compare, "after": args.code}
    results = {k: [] for k in labels}
    for _ in range(args.pairs if args.compare else 1):
        for label, code in labels.items():
            results[label].append(run_in(code, args.rounds, args.steps, args.threads))
    for label, runs in results.items():
        ratios = [r["ratio"] for r in runs]
        print(f"{label:>7}: ratio {statistics.median(ratios):.2f}x (runs: {', '.join(f'{x:.2f}' for x in ratios)}); "
              f"plain {statistics.median(r['plain_ms'] for r in runs):.2f} ms, "
              f"watched {statistics.median(r['watched_ms'] for r in runs):.2f} ms; hand-written floor "
              f"{statistics.median(r['floor'] for r in runs):.2f}x" + (
                  f"; its tensor work alone {statistics.median(r['tensor_work'] for r in runs):.2f}x"
                  if runs[0].get("tensor_work") else ""))


if __name__ == "__main__":
    main()
