"""Probe of the step quantities no test had checked against a float64 brute force this way (brief
probe_quant): every logged value of alpha, update_size, distance, param_norm, grad_norm, lr, loss, cabs,
early_stopping, mean_gsnr, grad_hist_1d / grad_hist_2d within 1e-4 relative (alpha: 1e-3 absolute;
histograms: the counts of the float32-rounded per-sample gradients) or NaN with a reason, over optimizers,
loop set-ups and sequence models written the way users write them (``unseen_quantity_models.py``)."""

import math

import pytest
import torch
from torch import nn

from unseen_quantity_models import (CE, OPTIMIZERS, STEP_SETUPS, agreeing_run, all_mismatches, batches, ce_of,
                                    dropout_lm_run, mlp, model_run, modified_after_step_run, plain,
                                    cnn_zoo_run, hf_style_run, regression_run,
                                    sequence_run, step_setup_run, watched)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizers(tmp_path, name):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = OPTIMIZERS[name](m)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.8)  # lr changes every batch

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            sched.step()
            t.stepped()

    observed = {"2.weight", "2.bias"} if name.endswith("subset") else None
    run, truth = watched(tmp_path, m, opt, loop, crit, observed=observed)
    assert all_mismatches(run, truth, m) == []
    first = next(iter(run))["values"]
    if name in ("sgd_weight_decay", "sgd_maximize", "sgd_plain_subset"):
        assert math.isfinite(float(first["cabs"]))  # checked against the formula, not NaN
    if name == "sgd_groups_lr0":
        assert first["lr/group0"] == 0.0 and first["lr/group1"] == 0.2


@pytest.mark.parametrize("name", STEP_SETUPS)
def test_alpha_and_update_under_loop_setups(tmp_path, name):
    run, truth, m = step_setup_run(tmp_path, name)
    assert all_mismatches(run, truth, m) == []
    alphas = [r["values"].get("alpha") for r in run][:-1]
    if name == "bn_train":  # samples mix in the forward: NaN with the reason
        assert all(math.isnan(float(a)) for a in alphas)
    else:
        assert all(math.isfinite(float(a)) for a in alphas)


@pytest.mark.parametrize("how", ["isfinite_check", "gradscaler_inf", "zero_grad_to_zeros"])
def test_alpha_around_skipped_steps(tmp_path, how):
    """Steps 2 and 5 are skipped (inf loss): alpha of steps 1 and 4 must be NaN with the reason (their end
    point never came), the others the brute force between consecutive taken steps."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)

    def loop(t):
        for k, (x, y) in enumerate(batches(7)):
            t.begin(ce_of(x, y))
            opt.zero_grad(set_to_none=how != "zero_grad_to_zeros")
            loss = crit(m(x), y) * (float("inf") if k in (2, 5) else 1.0)
            if how == "gradscaler_inf":
                scaler.scale(loss).backward()
                t.note_preclip(scaler.get_scale())
                scaler.unscale_(opt)
                if k not in (2, 5):
                    t.note_loss(loss.item())
                    t.note_grad()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                t.note_preclip()
                if k not in (2, 5):
                    t.note_loss(loss.item())
                    t.note_grad()
                    opt.step()
            if k not in (2, 5):
                t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m, skipped=(2, 5)) == []
    alpha = {r["step"]: r["values"].get("alpha") for r in run}
    assert math.isnan(float(alpha[1])) and math.isnan(float(alpha[4]))
    assert all(math.isfinite(float(alpha[k])) for k in (0, 3))


@pytest.mark.parametrize("kind,sizes,ignore", [
    ("lm", [5], False), ("lm", [4, 2], False), ("lm", [5], True), ("lm", [4, 2], True),
    ("lm_tied", [4, 2], True), ("gru_step", [5], False), ("gru_step", [4, 2], False), ("gru_step", [4, 2], True)])
def test_sequence_models(tmp_path, kind, sizes, ignore):
    """Histograms, noise statistics and the loss on a transformer with flattened logits and on a
    sequence-first GRU (samples are sequences), with unequal micro-batches and ignore_index. Found here:
    the loss of a sequence-first model's micro-batches was weighted by T (dim 0), not by their sequences;
    early_stopping near 0 was 1.8e-4 off (float32 arithmetic in ``_noise.snr_sums``)."""
    run, truth, m = sequence_run(tmp_path, kind, sizes, ignore)
    assert all_mismatches(run, truth, m) == []
    assert all(r["samples"] == sum(sizes) for r in run)
    assert all(math.isfinite(float(r["values"]["early_stopping"])) for r in run)


@pytest.mark.parametrize("sizes", [(5,), (3, 2)])
def test_transformer_with_dropout(tmp_path, sizes):
    run, truth, m = dropout_lm_run(tmp_path, sizes)
    assert all_mismatches(run, truth, m) == []
    first = next(iter(run))
    assert math.isfinite(float(first["values"]["mean_gsnr/enc.linear1.weight"]))  # exact, not NaN
    assert "dropout" in first["reasons"]["mean_gsnr/enc.self_attn.in_proj_weight"]
    assert first["data"]["grad_hist_1d"]["excluded"]  # the attention's parameters, the rest counted


def test_sequence_first_gru_classifier_on_the_last_hidden_state(tmp_path):
    """``head(h_n[0])`` of a sequence-first GRU: no per-sample values (NaN with reasons), never wrong ones."""
    run, truth, m = sequence_run(tmp_path, "gru_last", [4, 2])
    assert all_mismatches(run, truth, m, skip=("samples",)) == []


@pytest.mark.parametrize("name", ["zeroed", "zeroed_frozen_adam", "cnn"])
def test_zero_and_missing_gradients_and_a_cnn(tmp_path, name):
    """A parameter whose per-sample gradients are all 0 (mean_gsnr/<p> = 0, early_stopping/<p> = 1 by the
    formulas; the gradient tests 0/0: NaN with a reason), one never used (.grad None: left out of the totals),
    a frozen one under Adam, and a CNN whose inputs grow every step."""
    run, truth, m = model_run(tmp_path, name)
    assert all_mismatches(run, truth, m) == []
    if name.startswith("zeroed"):
        first = next(iter(run))
        assert first["values"]["mean_gsnr/extra.weight"] == 0.0 and first["values"]["early_stopping/extra.weight"] == 1.0
        assert first["reasons"]["norm_test/extra.weight"] and first["reasons"]["mean_gsnr/unused.weight"]


def test_samples_that_agree_leave_the_variance_unresolved(tmp_path):
    """Found here: mean_gsnr 8.4e-4 off where an element's per-sample gradients agree to 1e-3 (GSNR 1.4e4):
    the float32 sums cancel in m2/n - g^2. Now NaN with the reason there, exact elsewhere."""
    run, truth, m = model_run(tmp_path, "agreeing")
    assert all_mismatches(run, truth, m) == []
    rec = {r["step"]: r for r in run}
    assert "nearly equal float32 sums" in rec[1]["reasons"]["mean_gsnr"]
    assert "nearly equal float32 sums" in rec[1]["reasons"]["mean_gsnr/f.bias"]
    assert math.isfinite(float(rec[1]["values"]["mean_gsnr/c.weight"]))
    assert all(math.isfinite(float(rec[k]["values"]["mean_gsnr"])) for k in (0, 2, 3))


@pytest.mark.parametrize("spread", [1e-1, 3e-2, 1e-2, 1e-3])
def test_samples_whose_gradients_agree(tmp_path, spread):
    """Found here: with inputs 1e-2 apart, norm_test 3e-4, inner_test 2.4e-3, cabs 5e-4 relative off the
    float64 brute force; 1e-3 apart, inner_test logged 0 for 1.1e-4 (the variance, a difference of nearly
    equal float32 sums, rounded below 0). norm_test and cabs now share the inner/ortho tests' rule
    (``_resolution.cancellation``); mean_gsnr / early_stopping have their own (``_snr_resolution.py``)."""
    run, truth, m = agreeing_run(tmp_path, spread)
    assert all_mismatches(run, truth, m) == []
    first = next(iter(run))
    for q in ("norm_test", "inner_test", "ortho_test", "cabs"):
        if spread <= 1e-3:
            assert "too coarse" in first["reasons"][q], q
        elif spread == 1e-1 and q != "inner_test":
            # (inner_test: cond 741 there, beyond its estimate of 2 eps * cond since round 6; inner_test.py)
            assert math.isfinite(float(first["values"][q])), q


@pytest.mark.parametrize("how", ["clamp", "renorm"])
def test_parameters_changed_after_the_step(tmp_path, how):
    """Found here: WGAN weight clipping after optimizer.step() left update_size 0.48 for 0.54 and alpha -0.95
    for -0.61 (the optimizer's update, not the one taken). Now NaN with the reason, amended at the next step
    (the last step's at close); steps where nothing changed keep their values."""
    run, truth, m = modified_after_step_run(tmp_path, how)
    assert all_mismatches(run, truth, m) == []
    recs = list(run)
    nan = [math.isnan(float(r["values"]["update_size"])) for r in recs]
    if how == "clamp":
        assert all(nan) and "changed between optimizer.step()" in recs[0]["reasons"]["alpha"]
    else:
        assert nan[-1] and not all(nan)
        assert "0.weight" in recs[-1]["reasons"]["update_size"]
        assert math.isfinite(float(recs[-1]["values"]["update_size/2.weight"]))


@pytest.mark.parametrize("how", ["mean", "weighted", "masked"])
def test_loss_of_per_element_losses_combined_by_the_loop(tmp_path, how):
    """loss_fn with reduction='none', combined by the loop (``engine/loss_elements.py``, main): a plain or
    masked mean is logged exactly, unequal weights are NaN with the reason; every other value exact or NaN."""
    m, crit = mlp(), nn.CrossEntropyLoss(reduction="none")
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    w = {"mean": torch.ones(6), "weighted": torch.tensor([0.5, 1.0, 2.0, 1.0, 0.2, 1.3]),
         "masked": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])}[how]

    def loop(t):
        for x, y in batches(3):
            t.begin(lambda m64, x=x, y=y: CE(m64(x.double()), y) * w.double() * 6 / w.sum())
            opt.zero_grad()
            loss = (crit(m(x), y) * w).sum() / w.sum()
            t.note_loss(loss.item())
            loss.backward()
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    first = next(iter(run))
    if how == "weighted":
        assert "unequal" in first["reasons"]["loss"]
    else:
        assert math.isfinite(float(first["values"]["loss"]))


@pytest.mark.parametrize("how", [
    "no_grad_mul", "weights_only",
    pytest.param("data_mul", marks=pytest.mark.xfail(strict=True, reason=(
        "p.data.mul_() between backward() and optimizer.step() does not bump p._version (.data has a version "
        "counter of its own), so engine/param_versions.py cannot see it without a tensor pass over the "
        "parameters on every step: param_norm and distance are read after the change (distance 0.207 for 0 at "
        "step 0) and the last step's update_size misses it")))])
def test_parameters_changed_between_backward_and_step(tmp_path, how):
    """A manual weight decay between backward() and optimizer.step(). Found by the probe of 2026-12-07:
    distance 0.207 logged for 0 at step 0, param_norm 10% low, the last update_size without the decay. Now
    (engine/param_versions.py) param_norm, distance, update_size and alpha of those steps are NaN with the
    reason; where only the weights decay, the biases' parts keep their values."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))
            opt.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            loss.backward()
            with torch.no_grad():
                for p in m.parameters():
                    if how == "data_mul":
                        p.data.mul_(0.9)
                    elif how == "no_grad_mul" or p.dim() > 1:
                        p.mul_(0.9)
            t.note_grad()
            opt.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    last = list(run)[-1]
    for key in ("param_norm", "distance", "update_size"):
        assert "between the backward pass and optimizer.step()" in last["reasons"][key]
    if how == "weights_only":
        values = {k: float(v) for k, v in last["values"].items() if not isinstance(v, dict)}
        assert math.isfinite(values["param_norm/0.bias"]) and math.isfinite(values["update_size/2.bias"])
        assert math.isnan(values["param_norm/0.weight"])


@pytest.mark.parametrize("order", ["other_first", "other_after"])
def test_a_second_optimizer_trains_the_rest_of_the_model(tmp_path, order):
    """Body under the watched SGD, head under an unwatched Adam, both stepping every batch: the next step's
    loss is not on the watched update's line (the head moved too). Found here: alpha was logged as if only
    the update moved; now NaN with the reason. The other values are those of the watched parameters."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m[0].parameters(), lr=0.1, momentum=0.9)
    other = torch.optim.Adam(m[2].parameters(), lr=0.05)

    def loop(t):
        for x, y in batches(4):
            t.begin(ce_of(x, y))
            other.zero_grad()
            opt.zero_grad()
            loss = crit(m(x), y)
            t.note_loss(loss.item())
            loss.backward()
            t.note_grad()
            first, second = (other, opt) if order == "other_first" else (opt, other)
            first.step()
            second.step()
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit, observed={"0.weight", "0.bias"})
    assert all_mismatches(run, truth, m) == []
    assert all("another optimizer" in r["reasons"]["alpha"] for r in list(run)[:-1])


def test_param_group_added_after_watch(tmp_path):
    """The body is unfrozen and added to the optimizer at step 2 (not watched: said by a warning): the values
    of the watched head stay exact; alpha of steps 2 and 3 is NaN (the body moves off the head's update)."""
    m, crit = mlp(), nn.CrossEntropyLoss()
    for p in m[0].parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(m[2].parameters(), lr=0.1)

    def loop(t):
        for k, (x, y) in enumerate(batches(5)):
            if k == 2:
                for p in m[0].parameters():
                    p.requires_grad_(True)
                opt.add_param_group({"params": list(m[0].parameters()), "lr": 0.05})
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            t.stepped()

    with pytest.warns(RuntimeWarning, match="add_param_group"):
        run, truth = watched(tmp_path, m, opt, loop, crit, observed={"2.weight", "2.bias"})
    assert all_mismatches(run, truth, m) == []
    alpha = [r["values"].get("alpha") for r in run]
    assert math.isfinite(float(alpha[1])) and all(math.isnan(float(a)) for a in alpha[2:4])
    assert next(r for r in run if r["step"] == 2)["values"]["lr/group1"] == 0.05


@pytest.mark.parametrize("name", ["mse", "huber", "bce_pos_weight", "l1"])
def test_elementwise_losses_with_unequal_micro_batches(tmp_path, name):
    run, truth, m = regression_run(tmp_path, name)
    assert all_mismatches(run, truth, m) == []
    assert not next(iter(run)).get("reasons")  # every value exact, none NaN


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fine_tuning_loop(tmp_path, reduction):
    run, truth, m = hf_style_run(tmp_path, reduction)
    assert all_mismatches(run, truth, m) == []
    assert all(math.isfinite(float(r["values"]["alpha"])) for r in list(run)[:-1])


def test_cnn_with_norms_grouped_conv_and_dropout2d(tmp_path):
    run, truth, m = cnn_zoo_run(tmp_path)
    assert all_mismatches(run, truth, m) == []
    assert math.isfinite(float(next(iter(run))["values"]["mean_gsnr"]))


def test_the_harness_sees_a_wrong_value_and_a_wrong_histogram(tmp_path):
    m, crit = mlp(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def loop(t):
        for x, y in batches(3):
            t.begin(ce_of(x, y))
            plain(m, opt, crit, x, y, t)
            t.stepped()

    run, truth = watched(tmp_path, m, opt, loop, crit)
    assert all_mismatches(run, truth, m) == []
    records = [dict(r) for r in run]

    class Edited(list):
        skipped = run.skipped

    rec = records[0]
    rec["values"] = dict(rec["values"], early_stopping=float(rec["values"]["early_stopping"]) * (1 + 3e-4))
    counts = list(rec["data"]["grad_hist_1d"]["counts"])
    k = max(range(len(counts)), key=counts.__getitem__)
    counts[k] -= 3
    counts[k - 1] += 3
    rec["data"] = dict(rec["data"], grad_hist_1d=dict(rec["data"]["grad_hist_1d"], counts=counts))
    found = all_mismatches(Edited(records), truth, m)
    assert any("early_stopping" in p for p in found) and any("grad_hist_1d" in p for p in found)
