"""nn.MultiheadAttention's per-sample rule (cockpit_lite/persample/attention.py) against a float64 loop of
autograd over single samples, on every configuration it serves; the ones it does not serve go to the
torch.func fallback (checked to be taken, and still exact)."""

import pytest
import torch
from torch import nn

from cockpit_lite.persample import attention, rules
from cockpit_lite.persample.capture import LayerCapture
from cockpit_lite.persample.fallback import owned_parameters

B, T, S, E, H = 3, 5, 4, 6, 2


class Wrap(nn.Module):
    """x -> attention(x, x, x) (or cross-attention with ``memory``); the loss of sample i is
    sum_t,e tanh(out_ite * c_te)."""

    def __init__(self, mha, cross=False, kwargs_fn=None):
        super().__init__()
        self.mha, self.cross, self.kwargs_fn = mha, cross, kwargs_fn or (lambda rows: {})
        self.rows = slice(None)  # the samples of the batch (the reference runs one at a time)

    def forward(self, x, mem=None):
        k = v = x if mem is None else mem
        out = self.mha(x, k, v, **self.kwargs_fn(self.rows))
        return out[0] if isinstance(out, tuple) else out


def _loss(out, c):
    return torch.tanh(out * c).sum()


def _samples(model, x, mem, c, bdim, path):
    """{name: [B, *shape]} per-sample gradients from the layer rule, and whether the rule served (from the
    step's tapped projections, or with them dropped, recomputed)."""
    names = [n for n, _ in model.named_parameters()]
    cap = LayerCapture(model, names, list(model.parameters()))
    cap.arm()
    _loss(model(x, mem), c).backward()
    calls = cap.disarm().calls
    cap.remove()
    (call,) = [cl for cl in calls if isinstance(cl.module, nn.MultiheadAttention)]
    one = torch.ones((), dtype=x.dtype)
    if path == "recompute":
        call.taps = None
    served = attention.attention_samples(call.module, call, call.output_grad, one)
    if path == "taps" and served is not None:
        assert attention._from_taps(call.module, call, one) is not None
    got = rules.layer_samples(call, call.output_grad, x.shape[bdim], one)
    return {k: ps.materialize() for k, ps in got.items()}, served is not None


def _reference(model, x, mem, c, bdim):
    params = dict(owned_parameters(model.mha))
    out = {n: [] for n in params}
    for i in range(x.shape[bdim]):
        xi = x.narrow(bdim, i, 1)
        mi = None if mem is None else mem.narrow(bdim, i, 1)
        model.rows = slice(i, i + 1)
        li = _loss(model(xi, mi), c)
        gs = torch.autograd.grad(li, list(params.values()))
        for n, g in zip(params, gs):
            out[n].append(g)
    model.rows = slice(None)
    return {n: torch.stack(v) for n, v in out.items()}


def _check(mha, batch_first=True, cross=False, kwargs_fn=None, expect_served=True, dtype=torch.float64, path="taps"):
    torch.manual_seed(0)
    mha = mha.to(dtype)
    model = Wrap(mha, cross, kwargs_fn)
    bdim = 0 if batch_first else 1
    shape = (B, T, E) if batch_first else (T, B, E)
    x = torch.randn(*shape, dtype=dtype)
    kdim = mha.kdim
    mem = None
    if cross:
        mem = torch.randn(*((B, S, kdim) if batch_first else (S, B, kdim)), dtype=dtype)
    c = torch.randn(T, E, dtype=dtype)[:, None, :] if not batch_first else torch.randn(T, E, dtype=dtype)
    got, served = _samples(model, x, mem, c, bdim, path)
    ref = _reference(model, x, mem, c, bdim)
    assert served == expect_served
    assert set(got) == set(ref)
    for n in ref:
        torch.testing.assert_close(got[n].to(torch.float64), ref[n].to(torch.float64), rtol=1e-6 if dtype == torch.float64 else 2e-4,
                                   atol=1e-9 if dtype == torch.float64 else 1e-5, msg=n)


PATHS = ["taps", "recompute"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention(batch_first, bias, path):
    _check(nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first), batch_first, path=path)


@pytest.mark.parametrize("path", PATHS)
def test_float32(path):
    _check(nn.MultiheadAttention(E, H, batch_first=True), dtype=torch.float32, path=path)


causal = torch.triu(torch.ones(T, T, dtype=torch.bool), 1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kind", ["bool_causal", "float_mask", "is_causal", "padding", "padding_float", "both",
                                  "need_weights_false"])
def test_masks(kind, path):
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -2:] = True
    pad[2, -1] = True
    float_mask = torch.randn(T, T, dtype=torch.float64)
    fns = {
        "bool_causal": lambda rows: {"attn_mask": causal},
        "float_mask": lambda rows: {"attn_mask": float_mask},
        "is_causal": lambda rows: {"attn_mask": causal, "is_causal": True, "need_weights": False},
        "padding": lambda rows: {"key_padding_mask": pad[rows]},
        "padding_float": lambda rows: {"key_padding_mask": torch.where(pad, -1e4, 0.0).double()[rows]},
        "both": lambda rows: {"attn_mask": causal, "key_padding_mask": pad[rows]},
        "need_weights_false": lambda rows: {"need_weights": False},
    }
    _check(nn.MultiheadAttention(E, H, batch_first=True), kwargs_fn=fns[kind], path=path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("batch_first", [True, False])
def test_separate_projection_weights_cross_attention(path, batch_first):
    """kdim/vdim != embed_dim: q, k and v have their own weights; key and value are the memory."""
    _check(nn.MultiheadAttention(E, H, kdim=4, vdim=4, batch_first=batch_first), batch_first, cross=True, path=path)


def test_bias_kv_goes_to_the_exact_fallback():
    _check(nn.MultiheadAttention(E, H, add_bias_kv=True, batch_first=True), expect_served=False)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_cross_attention_is_served_from_the_taps_only(batch_first, bias):
    """Query distinct from key/value with packed weights: W_in's row blocks see different inputs."""
    _check(nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first), batch_first, cross=True)
    _check(nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first), batch_first, cross=True,
           path="recompute", expect_served=False)


def test_query_key_value_all_distinct():
    """Three different tensors: F.multi_head_attention_forward splits W_in in three row blocks."""
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(E, H, batch_first=True).double()
    x, k, v = (torch.randn(B, n, E, dtype=torch.float64) for n in (T, S, S))

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = mha

        def forward(self, x, k, v):
            return self.mha(x, k, v)[0]

    model = Three()
    names = [n for n, _ in model.named_parameters()]
    cap = LayerCapture(model, names, list(model.parameters()))
    cap.arm()
    model(x, k, v).tanh().sum().backward()
    (call,) = cap.disarm().calls
    cap.remove()
    one = torch.ones((), dtype=torch.float64)
    got = attention._from_taps(mha, call, one)
    assert got is not None
    for n, p in owned_parameters(mha):
        ref = torch.stack([torch.autograd.grad(model(x[i:i + 1], k[i:i + 1], v[i:i + 1]).tanh().sum(), p)[0]
                           for i in range(B)])
        torch.testing.assert_close(got[n].materialize(), ref, msg=n)


def test_add_zero_attn_is_served_from_the_taps_only():
    _check(nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True))
    _check(nn.MultiheadAttention(E, H, add_zero_attn=True, batch_first=True), path="recompute", expect_served=False)


def test_a_wrong_is_causal_hint_is_caught_by_the_output_check():
    """is_causal=True with a mask that is not causal: torch attends causally; the recomputation, which
    follows the mask, differs from the step's output, so the fallback (the module itself) serves (the
    tapped projections, taken from the step itself, are right either way)."""
    not_causal = torch.zeros(T, T, dtype=torch.bool)
    not_causal[:, 0] = True
    not_causal[0, 0] = False
    _check(nn.MultiheadAttention(E, H, batch_first=True),
           kwargs_fn=lambda rows: {"attn_mask": not_causal, "is_causal": True, "need_weights": False},
           expect_served=False, path="recompute")
    _check(nn.MultiheadAttention(E, H, batch_first=True),
           kwargs_fn=lambda rows: {"attn_mask": not_causal, "is_causal": True, "need_weights": False})


def test_transformer_encoder_layer_is_served():
    """nn.TransformerEncoderLayer's self-attention (how it calls the module) is served by the rule."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=8, dropout=0.0, batch_first=True).double()
    names = [n for n, _ in layer.named_parameters()]
    cap = LayerCapture(layer, names, list(layer.parameters()))
    cap.arm()
    layer(torch.randn(B, T, E, dtype=torch.float64), src_mask=causal, is_causal=True).pow(2).sum().backward()
    calls = cap.disarm().calls
    cap.remove()
    (call,) = [cl for cl in calls if isinstance(cl.module, nn.MultiheadAttention)]
    one = torch.ones((), dtype=torch.float64)
    assert attention._from_taps(call.module, call, one) is not None
    call.taps = None
    assert attention.attention_samples(call.module, call, call.output_grad, one) is not None


def test_the_tap_leaves_f_linear_as_it_was():
    """F.linear is patched only during a tracked attention call, also when the forward raises."""
    import torch.nn.functional as F
    from cockpit_lite.persample import attention_tap

    original = F.linear
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    cap = LayerCapture(mha, [n for n, _ in mha.named_parameters()], list(mha.parameters()))
    cap.arm()
    x = torch.randn(B, T, E)
    mha(x, x, x)
    assert F.linear is original
    with pytest.raises(Exception):
        mha(x, x, torch.randn(B, T + 1, E))  # key and value lengths differ: raises inside the call
    cap.disarm()
    assert F.linear is original
    cap.remove()
    assert attention_tap.stop() is None
