"""Stock Hugging Face models (GPT2LMHeadModel, BertForSequenceClassification from tiny configs, no
downloads) compute their loss inside ``forward``; ``watch(model, optimizer)`` with no ``loss_fn``
observes it there (cockpit_lite/integrations/hf_loss.py).

Checked against independent references: the logged loss is exactly ``outputs.loss``; every gradient
test (total and per parameter) equals a float64 brute force (each sequence evaluated alone, its share
of the batch's mean loss differentiated by autograd) within 1e-4 relative, or is NaN with a reason.
"""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import cockpit_lite

transformers = pytest.importorskip("transformers")
from reference import inner_test, norm_test, ortho_test  # noqa: E402

TESTS = {"norm_test": norm_test, "inner_test": inner_test, "ortho_test": ortho_test}
QUANTITIES = {name: "every" for name in ("loss", "grad_norm", *TESTS)}
B, T, V = 4, 8, 100


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=V, n_positions=16, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).train()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=V, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config).train()


def roberta():
    """RoBERTa's LM head holds its bias twice (``lm_head.bias is lm_head.decoder.bias``)."""
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=T + 4, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, pad_token_id=1)
    return transformers.RobertaForMaskedLM(config).train()


def mlm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(2, V, (B, T), generator=g)
    labels = torch.full((B, T), -100)
    labels[:, 2] = torch.randint(2, V, (B,), generator=g)  # masked positions: a few per sequence
    labels[1, 5], labels[3, 0] = 7, 9
    return x, labels


def mlm_shares(model, x, labels):
    """l_i = (B / N) * sum of sequence i's masked-token losses (N: the batch's masked tokens), alone."""
    n = int((labels != -100).sum())
    return [B / n * F.cross_entropy(model(input_ids=x[i:i + 1]).logits[0], labels[i], ignore_index=-100,
                                    reduction="sum") for i in range(B)]


def lm_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T), generator=g)
    labels = x.clone()
    labels[0, 5:] = -100  # padding ignored: the mean is over the tokens left
    labels[2, 3:] = -100
    return x, labels


def cls_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)


def lm_shares(model, x, labels):
    """l_i = (B / N) * sum of sequence i's token losses (N: tokens not ignored in the batch), alone."""
    n = int((labels[:, 1:] != -100).sum())
    return [B / n * F.cross_entropy(model(input_ids=x[i:i + 1]).logits[0, :-1], labels[i, 1:], ignore_index=-100,
                                    reduction="sum") for i in range(B)]


def cls_shares(model, x, y):
    return [F.cross_entropy(model(input_ids=x[i:i + 1]).logits, y[i:i + 1]) for i in range(B)]


def brute_force(model, shares, x, y):
    """{name: [B, numel]} float64 per-sample gradients of every parameter."""
    model = copy.deepcopy(model).double()
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    rows = [torch.autograd.grad(l, params, allow_unused=True) for l in shares(model, x, y)]
    return {n: torch.stack([(r[j] if r[j] is not None else torch.zeros_like(params[j])).reshape(-1) for r in rows])
            for j, n in enumerate(names)}


def train_one_step(model, x, y, logdir, **watch_options):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, optimizer, logdir=logdir, quantities=QUANTITIES, **watch_options) as cockpit:
            loss = model(input_ids=x, labels=y).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert cockpit.closed
    return float(loss), cockpit_lite.load(logdir)


def assert_brute_force_or_reason(record, G):
    """Every gradient test equals the brute force or is NaN with a reason. Parameters whose gradient is
    0 up to rounding (BERT's attention key bias: softmax is invariant to it) are left out: their
    statistics are ratios of rounding errors in both computations."""
    values, reasons = record["values"], record.get("reasons", {})
    scale = max(float(g.norm(dim=1).max()) for g in G.values())
    zero = {n for n, g in G.items() if float(g.norm(dim=1).max()) < 1e-6 * scale}
    checked = 0
    for key, value in values.items():
        name, _, param = key.partition("/")
        if name not in TESTS or param in zero:
            continue
        if value == "NaN" or (isinstance(value, float) and math.isnan(value)):
            assert reasons.get(key), f"{key} is NaN without a reason"
            continue
        columns = G[param] if param else torch.cat(list(G.values()), dim=1)
        assert value == pytest.approx(TESTS[name](columns.double()), rel=1e-4), key
        checked += 1
    return checked


@pytest.mark.parametrize("build, batch, shares", [(gpt2, lm_batch, lm_shares), (bert, cls_batch, cls_shares),
                                                  (roberta, mlm_batch, mlm_shares)],
                         ids=["GPT2LMHeadModel", "BertForSequenceClassification", "RobertaForMaskedLM"])
def test_plain_loop_observes_the_loss_inside_forward(tmp_path, build, batch, shares):
    """Position embeddings on position_ids [1, T] (persample/broadcast.py), a head bias held twice: the totals
    are the brute force's too, not NaN."""
    model = build()
    x, y = batch()
    G = brute_force(model, shares, x, y)
    loss, run = train_one_step(model, x, y, tmp_path / "run")
    (record,) = [r for r in run.records if not r.get("amends")]
    assert record["values"]["loss"] == loss  # exactly the model's own loss
    assert record["samples"] == B
    assert run.header["loss_fn"] == "ModelLoss"
    assert record["data"]["persample_check"]["status"] == "passed"  # the replay through the model's loss works
    assert assert_brute_force_or_reason(record, G) > 20
    total = torch.cat(list(G.values()), dim=1).double()
    for name, test in TESTS.items():
        assert record["values"][name] == pytest.approx(test(total), rel=1e-4), (name, record.get("reasons", {}).get(name))
    # nothing is left on the model: its loss_function and the global hook are gone
    assert "_loss_function" not in model.__dict__
    assert not torch.nn.modules.module._global_forward_hooks


def test_per_sample_losses_equal_the_brute_force_shares():
    """The re-evaluated per-sample losses (ModelLoss with reduction='none', grouped by sequence) are
    each sequence's share of the mean over the tokens left after ignore_index."""
    from cockpit_lite.integrations.hf_loss import ModelLossObserver
    from cockpit_lite.persample.losses import elementwise_loss, group_by_sample

    model = gpt2()
    x, labels = lm_batch()
    observer = ModelLossObserver(model).install()
    seen = []
    handle = observer.module.register_forward_hook(lambda m, args, out: seen.append((args, out)))
    try:
        loss = model(input_ids=x, labels=labels).loss
    finally:
        handle.remove()
        observer.remove()
    ((args, out),) = seen
    assert out is loss
    per = group_by_sample(elementwise_loss(observer.module, args[0], args[1:]), B, "mean", float(loss))
    ref = torch.stack(lm_shares(copy.deepcopy(model).double(), x, labels))
    torch.testing.assert_close(per.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per.mean().double(), torch.tensor(float(loss), dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_loss_changed_after_the_loss_call_is_logged_but_not_decomposed(tmp_path):
    """An auxiliary term added to the model's loss: 'loss' is the returned value; per-sample
    quantities and curvature are NaN with the reason (never the loss function's part as if it were all)."""

    class WithAuxiliaryLoss(transformers.GPT2LMHeadModel):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if out.loss is not None:
                out.loss = out.loss + 0.01 * self.lm_head.weight.pow(2).sum()
            return out

    model = WithAuxiliaryLoss(gpt2().config).train()
    x, labels = lm_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match="not the result of one loss call"):
        with cockpit_lite.watch(model, optimizer, logdir=tmp_path / "run",
                                quantities={"loss": "every", "norm_test": "every", "hess_trace": "every"}):
            loss = model(input_ids=x, labels=labels).loss
            loss.backward()
            optimizer.step()
    (record,) = [r for r in cockpit_lite.load(tmp_path / "run").records if not r.get("amends")]
    assert record["values"]["loss"] == float(loss)
    for key in ("norm_test/transformer.h.0.mlp.c_fc.weight", "hess_trace"):
        assert record["values"][key] == "NaN"
        assert "not the result of one loss call" in record["reasons"][key]


def test_eval_forwards_and_forwards_without_labels_are_not_observed(tmp_path):
    model = gpt2()
    x, labels = lm_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, optimizer, logdir=tmp_path / "run", quantities={"loss": "every"}):
            with torch.no_grad():
                model(input_ids=x, labels=labels)  # evaluation: not a training loss
            logits = model(input_ids=x).logits  # the user's own loss outside the model: not observed
            loss = model(input_ids=x, labels=labels).loss
            (loss + 0 * logits.sum()).backward()
            optimizer.step()
    (record,) = [r for r in cockpit_lite.load(tmp_path / "run").records if not r.get("amends")]
    assert record["values"]["loss"] == float(loss)



@pytest.mark.parametrize("sizes", [(1, 3), (2, 2), (3, 1)], ids=["1+3", "2+2", "3+1"])
def test_accumulated_micro_batches_divided_by_the_step_count_combine_to_the_step_loss(tmp_path, sizes):
    """Gradient accumulation as the Trainer does it: each micro-batch's loss is divided by the token count of
    the whole step (``num_items_in_batch``), so the step's loss is the sum of the micro-batch losses. The
    logged loss equals the whole batch's mean token loss; every gradient test equals the float64 brute
    force over the whole step (or is NaN with a reason), with unequal micro-batches too (each part's l_i
    scale by n / b_k, not b_k / N: persample/view.py)."""
    model = gpt2()
    x, y = lm_batch()
    G = brute_force(model, lm_shares, x, y)
    with torch.no_grad():
        whole = float(model(input_ids=x, labels=y).loss)
    n = int((y[:, 1:] != -100).sum())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, optimizer, logdir=tmp_path / "run", quantities=QUANTITIES):
            for part in (slice(0, sizes[0]), slice(sizes[0], B)):
                model(input_ids=x[part], labels=y[part], num_items_in_batch=n).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    (record,) = [r for r in cockpit_lite.load(tmp_path / "run").records if not r.get("amends")]
    assert record["values"]["loss"] == pytest.approx(whole, rel=1e-5)
    assert record["samples"] == B
    mean = torch.cat(list(G.values()), dim=1).sum(0) / B
    assert record["values"]["grad_norm"] == pytest.approx(float(mean.norm()), rel=1e-4)
    assert assert_brute_force_or_reason(record, G) > 20
