"""Round-5 probe A (tests/unseen_round5a_models.py): gradient checkpointing, convolution forms, sequence-first and
encoder-decoder attention, EmbeddingBag / padded Embedding, recurrent cells in a Python loop and bfloat16 autocast
on the CPU, at tiny sizes. Every logged per-sample value (norm / inner / ortho tests, mean_gsnr, early_stopping,
total and per parameter), grad_norm and the loss equal the float64 brute force within 1e-4 relative, or are NaN
with a reason naming the module or the cause. Under bfloat16 autocast: within 2e-2 (the documented tolerance) of the
float64 brute force or of the brute force of the run's own arithmetic (``autocast_reference``), which differ where
bfloat16 changes the gradients.

Found this way (fixed, each with its case below):
* (NaN made exact) the torch.func fallback passed the tensors inside tuple / dict arguments whole: LSTMCell
  called in a loop, ``cell(x_t, (h, c))`` or ``cell(x_t, hx=(h, c))``, was NaN ("Input batch size 1 doesn't match
  hidden0 batch size 4"), and a bare parameter on a root module taking a dict (an encoder-decoder's shared position
  table) was NaN with "StopIteration" (``persample/fallback.py`` now splits them as the per-sample replay does);
* (NaN made exact) a GRUCell / LSTMCell called without a state (the first time step) was NaN: its own zero state
  is not batched by vmap; the fallback now gives one per sample, as it did for nn.GRU / nn.RNN;
* (NaN made exact) where the fallback cannot trace a module (vmap), its parameters now come from the per-sample
  replay of the model (checked against the step's per-sample losses; a loop where vmap fails), as parameters no
  layer rule serves do: a learned initial state ``h0.expand(B, -1)`` fed to an RNNCell was NaN;
* (finite wrong values behind the self-check) a module returning several tensors of which a later one received
  a gradient (LSTMCell's (h, c)) was read from its first output's gradient only: the LSTMCell loop's fallback was
  36-47% off; the first-step self-check caught it and sent it to the replay, but where it cannot run the values
  stood (norm_test/cell.weight_ih 2.808 for 1.599). Such calls now go to the replay (``rules.py``);
* (finite wrong values) under bfloat16 autocast g came from .grad, whose elements are rounded to bfloat16, against
  float32 per-sample second moments: mean_gsnr of an RNN head 5.4% off; now from the per-sample sums (mean_grad.py);
* (NaN made exact) Embedding(max_norm) (vmap cannot trace it) comes from the replay, which gives it a copy: its
  in-place renorm moved the parameter's version, making param_norm / distance / update_size / alpha NaN.
Not a bug, documented: bfloat16 autocast values are those of the run's bfloat16 gradients, several percent off a
float32 run for a small ReLU CNN (its .grad too).
"""

import math

import pytest
import torch

import reference as R
from unseen_models import assert_nan_as_expected, reference

import unseen_round5a_models as M
from test_real_models_unseen import QS, compare, run_case
from test_unseen_round4 import _grad_norm_wrong

BAG = "1-D index list with offsets"
COARSE = "too coarse"  # _resolution / _snr_resolution: float32 does not resolve the value
SEQ_FIRST = "entries along the batch dimension"
# case -> a piece of every NaN's reason, or a tuple of pieces one of which each has (None: every value exact)
EXPECT = {
    "checkpoint_gpt_nonreentrant": None, "checkpoint_gpt_reentrant": None,
    "checkpoint_sequential_nonreentrant": None, "checkpoint_sequential_reentrant": None,
    "depthwise_separable": None, "dilated": None, "channels_last": None, "kim_cnn": None, "causal_tcn": None,
    "conv_transpose1d": None, "conv3d_strided_groups": None,
    # sequence-first: only the attention's own parameters (and a head on the pooled [B, d]) have values; the
    # layers on [T, B, d] are NaN naming their module (docs/known-limits.md, "Sequence-first layouts")
    "seq_first_mha": SEQ_FIRST, "seq2seq_seq_first": SEQ_FIRST,
    # was: 'pos' (a bare parameter of the root, whose input is a dict) NaN with "StopIteration"; now exact
    "seq2seq_batch_first": None, "decoder_memory": None,
    # EmbeddingBag(tokens, offsets): packed bags, no rule splits them (documented); the head stays exact
    # (bag_sum_offsets: early_stopping/head.weight near 0, its variance's estimate just over 1e-4 since round 6,
    # _snr_resolution.ROUNDING)
    "bag_mean_offsets": BAG, "bag_sum_offsets": (BAG, COARSE), "bag_sum_weighted": BAG, "bag_mean_2d": None, "bag_sum_2d": None,
    "embedding_padding_idx": None,
    # was: LSTMCell NaN ("Input batch size 1 doesn't match hidden0 batch size 4": its (h, c) tuple not split)
    "gru_cell_loop": None, "gru_cell_loop_lm": None, "lstm_cell_loop": None, "lstm_cell_loop_lm": None,
    "autocast_bf16_mlp": None, "autocast_bf16_cnn": None,
    # was: mean_gsnr/cell.bias_ih 0.1091 for 0.1065 (float64 and the autocast brute force alike): g taken from .grad,
    # whose elements bfloat16 rounded, against float32 per-sample second moments; now the per-sample sums (mean_grad.py)
    "autocast_bf16_gru_cell_loop": None,
    # was: mean_gsnr/head.weight 3.498 for 3.319 (5.4%), early_stopping/head.weight -9.507 for -8.969 (same cause);
    # h0 / the RNNCell: the per-sample replay under autocast does not reproduce the step's per-sample losses to 1e-3
    "autocast_bf16_cell_rnn_h0": "does not reproduce the step's per-sample losses",
    # second round (more_cases)
    # early_stopping/tok.weight (-0.0035; GSNR up to 2.2): the variance's rounding estimate 1e-4 of it since round 6
    # (its cancellation term counted at 2 eps, _snr_resolution.ROUNDING; measured 1.8e-5 off): NaN with the reason
    "albert_ckpt_nonre": COARSE, "albert_ckpt_re": COARSE, "albert_ckpt_accum_nonre": None, "albert_ckpt_accum_re": None,
    "shared_in_out_nonre": None, "shared_in_out_re": None, "hf_ckpt_nonre": None, "hf_ckpt_re": None,
    "dw_mult_transpose2d": None, "same_dilated_1d_zeros": None, "same_dilated_1d_circular": None,
    "same_dilated_1d_reflect": None, "seq_first_encoder": SEQ_FIRST, "mha_nobias_zero": None,
    "mha_float_mask_kpm": None, "bag2_max": None, "bag2_padding": None,
    # head.bias: one element whose samples agree (GSNR 577) decides mean_gsnr / early_stopping's variance; since
    # round 6 its rounding counts twice (_snr_resolution.dominant): NaN with the reason (it was 2.2e-5 off here,
    # others like it 1.3e-4)
    "mha_weights_used": "too coarse",
    "bag2_weighted_2d": None,
    # was: GRUCell / LSTMCell started from None (hx=None, or no state) NaN: "output with shape [1, 6] doesn't match
    # the broadcast shape [4, 1, 6]" (the cell's own zero state unbatched under vmap); LSTMCell's hx=(h, c) keyword
    # passed whole; now a zero state per sample, keyword tuples split: exact
    "cell_bi": None, "cell_lstm_kw": None, "cell_lstm_none": None,
    # nn.LSTM / nn.GRU read through h_n (and their output): served by the per-sample replay
    # (gru_both: early_stopping 0.0056, GSNR up to 6.5, judged too coarse since round 6 as albert_ckpt above)
    "lstm_h_n": None, "lstm_both": None, "gru_h_n": None, "gru_both": COARSE,
    # a learned initial state expanded over the batch into an RNNCell: the root module's own parameter, for which
    # the torch.func fallback over the whole model failed (vmap: "output with shape [1, 6] doesn't match the
    # broadcast shape [4, 1, 6]", the state unbatched): was NaN; now the per-sample replay's loop serves it: exact
    "cell_rnn_h0": None,
    # checkpointing around parameters the layer rules do not serve: torch.func refuses checkpoint, one sample at a
    # time its recomputation does not match (docs/known-limits.md, "Gradient checkpointing")
    "scaled_ckpt_nonre": ("fallback failed for ScaledCkpt", "float32"),
    "scaled_ckpt_re": ("fallback failed for ScaledCkpt", "float32"),
    "functional_ckpt_nonre": "disagrees with autograd", "functional_ckpt_re": "no module call",
    "ckpt_moe_nonre": "picked from the batch", "ckpt_moe_re": "picked from the batch",
}
# a sequence-first model's record leaves `samples` out rather than log T (docs/known-limits.md)
SAMPLES_LEFT_OUT = {"seq_first_mha", "seq2seq_seq_first", "seq_first_encoder"}
SLOW = set()


def _cases():
    return {**M.cases(), **M.more_cases()}


def test_every_case_has_an_expectation():
    assert sorted(EXPECT) == sorted(_cases())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(EXPECT)])
def test_exact_or_nan_with_reason(tmp_path, name):
    u = _cases()[name]()
    before, rec = run_case(u, tmp_path, {q: "every" for q in ["loss", "grad_norm", *QS]})
    if name.startswith("autocast"):
        wrong, nan = _compare_autocast(u, before, rec)
    else:
        wrong, nan = compare(u, before, rec)
        wrong += _grad_norm_wrong(u, before, rec)
    assert wrong == [], wrong
    assert_nan_as_expected(nan, EXPECT[name])
    assert "loss" not in nan and "grad_norm" not in nan
    assert rec.get("samples") == (None if name in SAMPLES_LEFT_OUT else u.B)


def _compare_autocast(u, before, rec):
    """Within 2e-2, the documented tolerance of autocast values (tests/engine/test_amp_compile.py), of the float64
    brute force or of the brute force of the run's own arithmetic (``M.autocast_reference``: per-sample backward
    passes through the batch's bfloat16 autocast graph), which differ where bfloat16 changes the gradients (the
    ReLU CNN: 28%); early_stopping = 1 - B mean_j(...) within 2e-2 of its term B mean_j(...) (they cancel near 0).
    Measured: within 6e-3 of one of them, 1.3e-2 of its term for early_stopping."""
    refs = [M.autocast_reference(u, before), reference(u, before)]
    vals, reasons = rec["values"], rec.get("reasons", {})
    wrong, nan = [], {}

    def check(key, got):
        v = float(vals.get(key, math.nan))
        if math.isnan(v):
            nan[key] = reasons.get(key)
        elif not any(math.isclose(v, ref, rel_tol=2e-2, abs_tol=2e-2 * abs(1 - ref) if key.startswith("early") else 0.0)
                     for ref in (got(loss, G, names) for loss, G, names in refs)):
            wrong.append((key, v, [got(*r) for r in refs]))

    names = refs[0][2]
    check("loss", lambda loss, G, names: loss)
    check("grad_norm", lambda loss, G, names: float(torch.sqrt(sum((g.mean(0) ** 2).sum() for g in G))))
    for j, n in enumerate(names):
        check(f"grad_norm/{n}", lambda loss, G, names, j=j: float(G[j].mean(0).norm()))
    for q, f in QS.items():
        check(q, lambda loss, G, names, f=f: f(R.flat(G)))
        for j, n in enumerate(names):
            check(f"{q}/{n}", lambda loss, G, names, f=f, j=j: f(R.flat([G[j]])))
    return wrong, nan


def test_bfloat16_autocast_is_the_runs_arithmetic_not_float32s(tmp_path):
    """A ReLU CNN at B=4 under CPU bfloat16 autocast: the logged values are those of the bfloat16 gradients the run
    computes (above), which differ from the float64 brute force of the float32 model by more than 2e-2: so does
    .grad itself (grad_norm/c1.bias 0.01901 for float64's 0.02034, 6.5%; mean_gsnr/c2.bias 0.1218 for 0.1683).
    Not a per-sample error: documented in docs/known-limits.md ("Mixed precision")."""
    u = M.cases()["autocast_bf16_cnn"]()
    before, rec = run_case(u, tmp_path, {q: "every" for q in ["loss", "grad_norm", *QS]})
    wrong, _ = compare(u, before, rec)
    wrong += _grad_norm_wrong(u, before, rec)
    far = {k for k, v, r in wrong if not math.isclose(v, r, rel_tol=2e-2, abs_tol=1e-3)}
    assert {"grad_norm/c1.bias", "mean_gsnr/c2.bias", "norm_test/c1.bias"} <= far, far
    assert _compare_autocast(u, before, rec) == ([], {})


def test_embedding_max_norm_replayed_without_touching_the_parameters(tmp_path):
    """Embedding(max_norm) renormalises the rows it reads, in place, in every forward. Its per-sample gradients come
    from the per-sample replay (vmap cannot trace it: was NaN); the replays (per-sample, the first-step self-check's,
    the curvature's) give it a copy (``param_slots.written_in_forward``): written through a detached alias, its
    version counter moved and param_norm, distance, update_size and alpha were NaN ("changed in place between the
    backward pass and optimizer.step()") on every step the replay ran, step 0 already through the self-check."""
    import warnings

    import cockpit_lite
    import unseen_round3_models as R3
    from unseen_models import reference

    u = R3.embedding_cases()["embedding_max_norm_1"]()
    model, crit = u.model, u.loss_fn
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y, _), = u.micro
    norms, befores = [], []

    def note(*_):  # the parameters the step's quantities read (returns None: the step's arguments unchanged)
        norms.append(float(torch.sqrt(sum((p.detach() ** 2).sum() for p in model.parameters()))))
        befores.append({k: v.clone() for k, v in model.state_dict().items()})

    opt.register_step_pre_hook(note)
    qs = ["loss", "grad_norm", "param_norm", "distance", "update_size", "alpha", *QS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run", quantities={q: "every" for q in qs}):
            for _ in range(3):
                opt.zero_grad()
                crit(model(x), y).backward()
                opt.step()
    recs = [r for r in cockpit_lite.load(tmp_path / "run").records if r.get("type") == "step" and not r.get("amends")]
    assert [r["step"] for r in recs] == [0, 1, 2]
    for rec, norm, state in zip(recs, norms, befores):
        vals = rec["values"]
        before = type(model)()
        before.load_state_dict(state)
        assert not any("changed in place" in r for r in rec.get("reasons", {}).values()), rec.get("reasons")
        assert vals["param_norm"] == pytest.approx(norm, rel=1e-6)
        assert math.isfinite(vals["distance"]) and math.isfinite(vals["update_size"])
        ref_loss, G, names = reference(u, before)
        for q, f in QS.items():
            assert vals[q] == pytest.approx(f(R.flat(G)), rel=1e-4, abs=1e-4 if q == "early_stopping" else 0), q
    assert math.isfinite(recs[0]["values"]["alpha"]) and math.isfinite(recs[1]["values"]["alpha"])


@pytest.mark.parametrize("name", ["lstm_cell_loop", "mha_weights_used"])
def test_a_module_whose_later_outputs_get_gradient_goes_to_the_replay_without_the_self_check(tmp_path, monkeypatch,
                                                                                                name):
    """LSTMCell returns (h, c) and h is computed from c inside it; attention weights returned and used. The fallback
    (and the attention rule) read the first output's gradient only: with the first-step self-check off (as where it
    cannot run), the LSTMCell loop logged norm_test/cell.weight_ih 2.808 for 1.599 (adding c's hook gradient double
    counts the path through h: still 75% off). Such a call now goes to the per-sample replay (``rules.py``): exact."""
    from cockpit_lite.engine.cockpit import Cockpit

    monkeypatch.setattr(Cockpit, "_check_rules", lambda self, ctx: None)
    u = _cases()[name]()
    before, rec = run_case(u, tmp_path)
    wrong, nan = compare(u, before, rec)
    # (mha_weights_used: head.bias's variance too coarse in float32, see EXPECT; the attention's own values exact)
    coarse = {k for k, r in nan.items() if "too coarse" in r and (k.endswith("head.bias") or "/" not in k)}
    assert wrong == [] and set(nan) == coarse, (wrong, nan)
