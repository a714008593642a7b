"""Round-5 probe A (tests/unseen_round5a_models.py): gradient checkpointing, convolution forms, sequence-first and
encoder-decoder attention, EmbeddingBag / padded Embedding, recurrent cells in a Python loop and bfloat16 autocast
on the CPU, at tiny sizes. Every logged per-sample value (norm / inner / ortho tests, mean_gsnr, early_stopping,
total and per parameter), grad_norm and the loss equal the float64 brute force within 1e-4 relative (2e-2 under
bfloat16 autocast), or are NaN with a reason naming the module or the cause.

Found this way (fixed, each with its case below):
* (NaN made exact) the torch.func fallback passed the tensors inside tuple / dict arguments whole: LSTMCell
  called in a loop, ``cell(x_t, (h, c))``, was NaN ("Input batch size 1 doesn't match hidden0 batch size 4"), and a
  bare parameter on a root module taking a dict (an encoder-decoder's shared position table) was NaN with
  "StopIteration" (``persample/fallback.py`` now splits them as the per-sample replay does).
"""

import math

import pytest

import unseen_round5a_models as M
from test_real_models_unseen import QS, compare, run_case
from test_unseen_round4 import _grad_norm_wrong

BAG = "1-D index list with offsets"
SEQ_FIRST = "entries along the batch dimension"
# case -> a piece of every NaN's reason (None: every value exact)
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
    "bag_mean_offsets": BAG, "bag_sum_offsets": BAG, "bag_sum_weighted": BAG, "bag_mean_2d": None, "bag_sum_2d": None,
    "embedding_padding_idx": None,
    # was: LSTMCell NaN ("Input batch size 1 doesn't match hidden0 batch size 4": its (h, c) tuple not split)
    "gru_cell_loop": None, "gru_cell_loop_lm": None, "lstm_cell_loop": None, "lstm_cell_loop_lm": None,
    "autocast_bf16_mlp": None, "autocast_bf16_cnn": None,
}
# a sequence-first model's record leaves `samples` out rather than log T (docs/known-limits.md)
SAMPLES_LEFT_OUT = {"seq_first_mha", "seq2seq_seq_first"}
SLOW = set()
# bfloat16 autocast: per-sample gradients carry bfloat16's rounding (eps 7.8e-3), amplified by rho or a
# cancellation: norm_test/c1.bias 4.867 for float64's 4.556 (a per-sample bfloat16 loop gives 4.850)
WRONG = {"autocast_bf16_cnn": "finite values beyond 2e-2 under bfloat16 autocast: no resolution rule for it yet"}


def _marks(n):
    if n in WRONG:
        return [pytest.mark.xfail(strict=True, reason=WRONG[n])]
    return [pytest.mark.slow] if n in SLOW else []


def test_every_case_has_an_expectation():
    assert sorted(EXPECT) == sorted(M.cases())


@pytest.mark.parametrize("name", [pytest.param(n, marks=_marks(n)) for n in sorted(EXPECT)])
def test_exact_or_nan_with_reason(tmp_path, name):
    u = M.cases()[name]()
    before, rec = run_case(u, tmp_path, {q: "every" for q in ["loss", "grad_norm", *QS]})
    wrong, nan = compare(u, before, rec)
    wrong += _grad_norm_wrong(u, before, rec)
    if name.startswith("autocast"):  # bfloat16 forward: the documented tolerance (tests/engine/test_amp_compile.py)
        wrong = [(k, v, r) for k, v, r in wrong if not math.isclose(v, r, rel_tol=2e-2, abs_tol=1e-3)]
    assert wrong == [], wrong
    assert all(nan.values()), [k for k, r in nan.items() if not r]
    if EXPECT[name] is None:
        assert nan == {}, nan
    else:
        assert nan and all(EXPECT[name] in r for r in nan.values()), nan
        assert "loss" not in nan and "grad_norm" not in nan
    assert rec.get("samples") == (None if name in SAMPLES_LEFT_OUT else u.B)
