"""The set-up of a ``PerSampleView`` (``view.py``): which micro-batches were back-propagated, with which
scale (b_k / s_k, or n / s_k for a loss divided by the whole step's count), which captured layer calls
feed which parameter, what no rule covers (a module called without the batch dimension, a
sequence-first layout, a failed self-check) and the per-sample replay of those (``replayed.py``).
Functions of the view, ``self`` as their first argument."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch.utils._pytree import tree_leaves

from ..loss_combine import step_normalised
from .fallback import owned_parameters
from .norm import BATCHNORM_REASON, batchnorm_mixes_samples
from .row_order import reason as gathered_reason
from .rules import rule_for
from .samples import DenseSamples


def setup(self, captured) -> None:
    """Fill ``self`` (a ``PerSampleView``): the micro-batches, their scales and shares, which layer calls
    feed which parameter, and the parameters left to the per-sample replay."""
    calls = list(captured.calls) if captured is not None else []
    # KLDivLoss(reduction="batchmean"): the sum of the elements over the loss input's rows, a mean whose normaliser
    # (the rows) losses.py recovers from the logged loss as for any mean
    self.reduction = "mean" if self.inputs.reduction == "batchmean" else self.inputs.reduction
    mbs = [m for m in self.inputs.micro_batches if m.backpropagated]
    forwards = sorted({c.forward for c in calls})
    self.forwards = forwards
    self.calls_by_forward = {k: [c for c in calls if c.forward == k] for k in forwards}
    self.batch_sizes: List[int] = []
    self.factors: List[torch.Tensor] = []
    off_batch = {}  # id(call) -> (its size, the forward's batch size): a module called without the batch dimension
    for k in forwards:
        sizes = [_batch_size(c) for c in self.calls_by_forward[k]]
        # calls on rows gathered by an index (row_order.py) do not vote: many experts' calls would outnumber the rest;
        # nor do calls without a tensor input (a parametrization's weight: its rows are the weight's, not samples)
        votes = [n for c, n in zip(self.calls_by_forward[k], sizes) if c.gathered is None and _has_input(c)] or sizes
        # the batch: where attention declares its batch dimension (batch_first), its size (the layers
        # around a sequence-first attention see T along dim 0); else the size most calls agree on
        # (ties: the first call's)
        declared = [n for c, n in zip(self.calls_by_forward[k], sizes)
                    if isinstance(c.module, torch.nn.MultiheadAttention)]
        b = declared[0] if declared else max(votes, key=lambda v: (votes.count(v), -votes.index(v)))
        self.batch_sizes.append(b)
        off_batch.update((id(c), (n, b)) for c, n in zip(self.calls_by_forward[k], sizes) if n != b)
    self.sample_dim = 0  # of the model inputs and output
    seq_first = [c for c in calls if isinstance(c.module, torch.nn.RNNBase) and not c.module.batch_first
                 and c.inputs and isinstance(c.inputs[0], torch.Tensor) and c.inputs[0].dim() == 3]
    seq_first_reason = None
    if seq_first and len({c.forward for c in seq_first}) == len(forwards):
        # a recurrent module with batch_first=False declares dim 1 as the batch: every parameter is taken
        # from the per-sample replay along dim 1 (the layer rules read dim 0)
        first = {}
        for c in seq_first:
            first.setdefault(c.forward, c)
        self.batch_sizes = [int(first[k].inputs[0].shape[1]) for k in forwards]
        self.sample_dim = 1
        c = seq_first[0]
        seq_first_reason = (f"sequence-first layout: '{c.module_name}' ({type(c.module).__name__}, batch_first="
                            "False) reads dim 1 as the batch, which the per-sample layer rules (dim 0) do not")
    # (not where a module declares where the batch is: a sequence-first attention's loss has T rows)
    declared_any = any(isinstance(c.module, torch.nn.MultiheadAttention) for c in calls)
    rows_reason = (_rows_disagree(self, mbs, forwards) if seq_first_reason is None and not declared_any
                   and getattr(self.inputs.watched, "seq_first", None) is None else None)
    self.n_local = int(sum(self.batch_sizes))  # samples of this process
    overwritten = getattr(captured, "overwritten", None)
    if overwritten:
        self._global_reason = (f"the input of '{overwritten[0]}' was modified in place after its forward (e.g. a static "
                               "input buffer refilled for the next micro-batch with x_buf.copy_(x)): the per-sample "
                               "gradients need each micro-batch's own input; pass a new tensor per micro-batch")
    elif not calls:
        self._global_reason = "no layer with observed parameters received a gradient on this step"
    elif getattr(self.inputs.watched, "seq_first", None) is not None and seq_first_reason is None and not declared_any:
        # declared sequence-first, but no recurrent call read dim 1 (one whose output got no gradient, e.g. only
        # h_n was used): the layers' dim 0 counts positions, not samples
        self._global_reason = (f"{self.inputs.watched.seq_first} makes dim 1 the batch, but no call of it with a "
                               "gradient was observed on this step (e.g. only its final hidden state was used): the "
                               "layers' dim 0 counts positions, not samples")
    elif self.reduction not in ("mean", "sum"):
        # reduction="none" combined in the loop with unequal weights says how (engine/loss_elements.py)
        self._global_reason = next((m.elements for m in mbs if getattr(m, "elements", None)), None) or (
            f"the loss reduction is {self.reduction!r}; per-sample gradients need the loss module passed as "
            "watch(..., loss_fn=...) with reduction 'mean' or 'sum' (or 'none' with the elements weighed equally)")
    elif any(m.outside for m in mbs):
        self._global_reason = next(m.outside for m in mbs if m.outside)
    elif any(m.repeats for m in mbs):
        self._global_reason = ("loss calls of this step read the same samples more than once (losses of two heads "
                               "on one forward, or a forward repeated on the same input): sample i's gradient is "
                               "the sum over those calls, which the per-sample layer data do not separate")
    elif any(getattr(m, "coupled", None) for m in mbs):
        self._global_reason = next(m.coupled for m in mbs if getattr(m, "coupled", None))
    elif len(mbs) != len(forwards):
        self._global_reason = (f"{len(forwards)} model forward passes but {len(mbs)} back-propagated loss calls "
                               "on this step: cannot match micro-batches to losses")
    # a micro-batch loss already divided by the step's count (num_items_in_batch) is a part of the step's
    # mean, not a mean of its own: its samples' l_i scale by n_local / b_k (``loss_combine.step_normalised``)
    parts = step_normalised(mbs) and self.reduction == "mean"
    self.shares = [self.n_local / b if parts and b else 1.0 for b in self.batch_sizes]
    if self._global_reason is None:
        for mb, b, share in zip(mbs, self.batch_sizes, self.shares):
            s = mb.loss_scale
            if s is None or s.numel() != 1 or float(s) == 0.0:
                self._global_reason = "the gradient arriving at the loss (its backward scale) is unknown or zero"
                break
            s = s.detach().reshape(()).float()
            self.factors.append((b * share / s) if self.reduction == "mean" else (1.0 / s))
    self.micro_batches = mbs
    # parameter -> [(forward position, call, attribute name)]
    self.feeds: Dict[int, list] = {j: [] for j in range(len(self.params))}
    # no gradient on this step: 0 here (frozen, or written by none of the step's backward passes, e.g. a
    # backward(inputs=head_params): their layers' outputs may still have received a gradient)
    reached = getattr(captured, "reached", None)
    self.frozen = {j for j, p in enumerate(self.params)
                   if not p.requires_grad or (reached is not None and id(p) not in reached)}
    for pos, k in enumerate(forwards):
        fcalls = self.calls_by_forward[k]
        bn_orders = [c.order for c in fcalls if batchnorm_mixes_samples(c.module, c.training)]
        last_bn = max(bn_orders) if bn_orders else -1
        for c in fcalls:
            for attr, p in owned_parameters(c.module):
                j = self._index.get(id(p))
                if j is None or j in self.frozen:
                    continue
                self.feeds[j].append((pos, c, attr))
                if c.order <= last_bn:
                    self._reasons.setdefault(self.names[j], BATCHNORM_REASON)
                if c.gathered is not None:
                    self._replay.setdefault(j, gathered_reason(c.module_name, c.gathered))
                elif c.ambiguous is not None:
                    self._replay.setdefault(j, c.ambiguous)
                elif _not_the_rules(c, attr):
                    self._replay.setdefault(j, (
                        f"'{c.module_name}' ({type(c.module).__name__}) computes with a '{attr}' that its layer rule "
                        "does not read (a hook-based reparametrization, torch.nn.utils.spectral_norm / weight_norm: "
                        "the rule's per-sample gradients are those of the weight computed from it)"))
                elif not _has_input(c):
                    self._replay.setdefault(j, (
                        f"its module ('{c.module_name}', {type(c.module).__name__}) is called without a tensor input "
                        "(a parametrization computing a weight from it): its output has no batch dimension"))
                elif id(c) in off_batch:
                    n, b = off_batch[id(c)]
                    self._replay.setdefault(j, (
                        f"its module ('{c.module_name}') was called on {n} entries along the batch dimension "
                        f"where the other layers of the forward saw {b} samples: a module called without the "
                        "batch dimension (e.g. nn.Embedding(T, d)(torch.arange(T)) broadcast over the batch; call "
                        "it with arange(T).expand(B, -1)) has no per-sample gradients"))
    for j, name in enumerate(self.names):
        if not self.feeds[j] and self.params[j].grad is not None and name not in self._reasons:
            if bool((self.params[j].grad != 0).any()):
                self._replay.setdefault(j, "its gradient comes from no module call that cockpit-lite could observe "
                                           "(used outside a module's forward?)")
    if seq_first_reason is not None or rows_reason is not None:
        for j, name in enumerate(self.names):
            if j not in self.frozen and name not in self._reasons and self.params[j].grad is not None:
                self._replay[j] = seq_first_reason or rows_reason
    index = {name: j for j, name in enumerate(self.names)}
    for name, why in getattr(self.inputs.watched, "rule_failures", {}).items():
        if name in index and name not in self._reasons and index[name] not in self.frozen:
            if name in getattr(self.inputs.watched, "replay_rejected", {}):
                self._reasons[name] = why  # the replay does not explain .grad either (selfcheck.py)
            else:
                self._replay.setdefault(index[name], why)  # failed the self-check (selfcheck.py)
    if self._global_reason is not None:
        for name in self.names:
            self._reasons[name] = self._global_reason
    else:
        resolve_replays(self)

def _rows_disagree(self, mbs, forwards):
    """A forward whose layers saw b rows along dim 0 where its loss has a number of samples that is not a
    multiple of b (two augmented views stacked into [2B, ...] and averaged before the loss), or a module called
    on parts of the loss's samples (an encoder run over the batch in chunks, ``torch.cat([enc(c) for c in
    x.split(4)])``: its rows are summed per row as if each call saw the same samples): the rows are not the
    samples. The loss's count is taken as the batch (every parameter then comes from the per-sample replay over
    the model inputs, trusted only where it reproduces the per-sample losses); the reason, else None."""
    if len(mbs) != len(forwards):
        return None
    inputs = list(getattr(self.inputs, "model_calls", None) or [])
    rows_in = [_input_rows(c) for c in inputs] if len(inputs) == len(forwards) else [None] * len(forwards)
    bad = [(pos, mb.batch_size, b, _chunked(self.calls_by_forward[k], mb.batch_size)
            if rows_in[pos] == mb.batch_size else None)
           for pos, (k, mb, b) in enumerate(zip(forwards, mbs, self.batch_sizes)) if mb.batch_size and b]
    bad = [x for x in bad if x[1] % x[2] or x[3]]
    if not bad:
        return None
    for pos, rows, _, _ in bad:
        self.batch_sizes[pos] = int(rows)
    _, rows, b, chunks = bad[0]
    if chunks:
        return (f"'{chunks[0]}' is called {chunks[1]} times in one forward on parts of the loss's {rows} samples "
                f"(rows {' + '.join(str(n) for n in chunks[2])}: the batch run in chunks), and the layer rules read "
                "each call's rows as the whole batch")
    return (f"the layers saw {b} rows along the batch dimension where the loss has {rows} samples (the forward "
            "stacks or splits the batch, e.g. two augmented views concatenated): the layer rules' rows are not samples")


def _input_rows(model_call) -> Optional[int]:
    """Rows along dim 0 of the model call's first tensor argument (its batch), or None."""
    first = next((a for a in tree_leaves((model_call.args, model_call.kwargs))
                  if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    return int(first.shape[0]) if first is not None else None


def _chunked(calls, n: int):
    """(module name, calls, their rows) of a module called at least twice in one forward on fewer than the loss's
    ``n`` samples each, with rows adding up to n (the batch in chunks; asked only where the model's input has n
    rows: a cell called per time step of [B, T] inputs, its outputs flattened to B * T rows, is not); else None."""
    by_module: Dict[int, list] = {}
    for c in calls:
        by_module.setdefault(id(c.module), []).append(c)
    for group in by_module.values():
        rows = [_batch_size(c) for c in group]
        if len(group) > 1 and all(r and r < n for r in rows) and sum(rows) == n:
            return group[0].module_name, len(group), rows
    return None


def resolve_replays(self, wanted: Optional[Dict[int, str]] = None) -> None:
    """Per-sample gradients of the parameters no layer rule covers (``wanted``: {index: why}, by default those
    setup found), by a per-sample replay of the model (``replayed.py``); where it is impossible, NaN with the
    layer rules' reason and the replay's."""
    from .replayed import ReplayUnavailable, replayed_grads

    if wanted is None:
        wanted = {j: why for j, why in self._replay.items() if self.names[j] not in self._reasons}
    if not wanted:
        return
    calls = list(self.inputs.model_calls or [])
    all_mbs = list(self.inputs.micro_batches)
    if len(calls) == len(all_mbs) and len(all_mbs) != len(self.micro_batches):
        calls = [c for c, m in zip(calls, all_mbs) if m.backpropagated]
    try:
        if len(calls) != len(self.micro_batches):
            raise ReplayUnavailable(f"{len(calls)} model forward(s) kept for {len(self.micro_batches)} "
                                    "back-propagated loss call(s)")
        losses = self.losses()
        out, start = {j: [] for j in wanted}, 0
        for pos, (call, mb, b, share) in enumerate(zip(calls, self.micro_batches, self.batch_sizes, self.shares)):
            got = replayed_grads(self.inputs.watched.model, self.inputs.watched.loss_fn, call, mb, b, self.reduction,
                                 {j: self.params[j] for j in wanted}, losses[start:start + b] / share,
                                 self.sample_dim)
            start += b
            for j in wanted:  # detached: a replay of a parameter the graph still needs (a bare table) tracks grads
                g = got[j].detach()
                out[j].append((pos, [DenseSamples(g * share if share != 1.0 else g)]))
        self._replayed.update(out)
    except ReplayUnavailable as err:
        for j, why in wanted.items():
            self._reasons[self.names[j]] = f"{why}; a per-sample replay of the model was not possible: {err}"


def _not_the_rules(call, attr: str) -> bool:
    """Whether a stock layer's rule serves the call but not its parameter ``attr``: the rules of Linear, convolutions,
    Embedding and the norms read ``weight`` and ``bias``; the old hook-based ``spectral_norm`` / ``weight_norm`` leave
    ``weight`` a tensor computed before each call from ``weight_orig`` (``weight_g``, ``weight_v``), which the rule
    does not serve (was: a KeyError in every per-sample quantity, its per-parameter values NaN without a reason)."""
    if attr in ("weight", "bias"):
        return False
    rule = rule_for(call.module, call.inputs[0] if call.inputs else None)
    return rule is not None and rule.name != "attention"


def _has_input(call) -> bool:
    """Whether the call had a tensor among its inputs. A ``ParametrizationList`` (``orthogonal``,
    ``spectral_norm``, ``weight_norm``) computes the weight from its own ``original`` with no input: where the weight
    has B rows its output looked batched, and the fallback, given no input to batch, failed (NaN for a square
    orthogonal or spectral-norm Linear with B == out_features)."""
    # (inside a dict / tuple argument or a keyword too: a root module taking {"src": ..., "tgt": ...} has inputs)
    return any(isinstance(a, torch.Tensor) for a in tree_leaves((call.inputs, call.kwargs)))


def _batch_size(call) -> int:
    from .fallback import batch_dim_of

    g = call.output_grad
    first = next((a for a in call.inputs if isinstance(a, torch.Tensor)), None)
    bdim = batch_dim_of(call.module, first) if first is not None else 0
    return int(g.shape[bdim]) if g.dim() > bdim else 1
