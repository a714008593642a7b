"""Stock Hugging Face models whose parameters no layer rule serves, with the loss computed inside ``forward``.

Swin folds its attention windows into the batch dimension, BEiT indexes a relative-position table with no batch
dimension, Mamba's mixer uses its conv1d and dt_proj.bias functionally: their per-sample gradients come from the
per-sample replay (``persample/replayed.py``), which needs the loss of each sample from the model alone. These
models compute their loss inside ``forward`` from ``labels=``: the replay re-runs the model without its labels and
evaluates the observed loss form on the output entry the loss read (``ModelLoss.output_key``). Was: NaN for those
parameters and for every total ("the loss input is neither the model output nor read from it"). Checked against a
float64 brute force (each sample alone, its share of the batch's mean loss): the gradient tests, total and per
parameter, and alpha (two steps on the same batch).
"""

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from reference import alpha_of_step, inner_test, norm_test, ortho_test

transformers = pytest.importorskip("transformers")

B = 4
TESTS = {"norm_test": norm_test, "inner_test": inner_test, "ortho_test": ortho_test}


def swin():
    return transformers.SwinForImageClassification(transformers.SwinConfig(
        image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1], num_heads=[2], window_size=2,
        mlp_ratio=2.0, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0))


def beit():
    return transformers.BeitForImageClassification(transformers.BeitConfig(
        image_size=8, patch_size=4, num_channels=3, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=16, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0, use_relative_position_bias=True, layer_scale_init_value=0.1))


def mamba():
    return transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=30, hidden_size=8, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3, time_step_rank=2))


def _image_batch():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, 3, 8, 8, generator=g), torch.randint(0, 3, (B,), generator=g)

    def shares(m):
        return [nn.functional.cross_entropy(m(pixel_values=x[i:i + 1].double()).logits, y[i:i + 1]) for i in range(B)]

    return {"pixel_values": x, "labels": y}, shares


def _token_batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 30, (B, 6), generator=g)
    labels = x.clone()
    labels[0, 4:] = -100
    n = int((labels[:, 1:] != -100).sum())

    def shares(m):  # l_i = (B / N) * sum of sequence i's token losses (N: the batch's tokens counted)
        return [B / n * nn.functional.cross_entropy(m(input_ids=x[i:i + 1]).logits[0, :-1], labels[i, 1:],
                                                     ignore_index=-100, reduction="sum") for i in range(B)]

    return {"input_ids": x, "labels": labels}, shares


CASES = {"SwinForImageClassification": (swin, _image_batch), "BeitForImageClassification": (beit, _image_batch),
         "MambaForCausalLM": (mamba, _token_batch)}


@pytest.mark.parametrize("name", list(CASES))
def test_replayed_parameters_against_brute_force(tmp_path, name):
    build, batch = CASES[name]
    torch.manual_seed(0)
    model = build().train()
    inputs, shares = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, logdir=tmp_path / "run",
                                quantities={"alpha": "every", **{q: "every" for q in TESTS}}):
            for _ in range(2):  # the same batch twice: step 0's far end is step 1's start
                snaps.append(copy.deepcopy(model.state_dict()))
                opt.zero_grad()
                model(**inputs).loss.backward()
                opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    record = run.records[0]
    assert record["data"]["persample_check"]["status"] == "passed"

    ref_alpha, _, G0 = alpha_of_step(model, snaps, shares)
    columns = dict(zip([n for n, _ in model.named_parameters()], G0.split([p.numel() for p in model.parameters()], 1)))
    scale = float(G0.norm(dim=1).max())
    # a gradient that is 0 up to rounding (Swin's key bias: softmax is invariant to it): ratios of rounding errors
    # on both sides, NaN with the resolution's reason; every other value has no reason
    zero = {n for n, g in columns.items() if float(g.norm(dim=1).max()) < 1e-6 * scale}
    assert {k for k in record.get("reasons", {}) if k.partition("/")[2] not in zero} == set(), record["reasons"]
    checked = 0
    for key, value in record["values"].items():
        q, _, param = key.partition("/")
        if q not in TESTS or param in zero:
            continue
        assert not math.isnan(value), key
        assert value == pytest.approx(TESTS[q](columns[param] if param else G0), rel=1e-4), key
        checked += 1
    assert checked >= 3 * 10
    assert run.series("alpha")[1][0] == pytest.approx(ref_alpha, abs=1e-3)
