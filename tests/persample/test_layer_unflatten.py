"""A loss input that is a biased Linear's output on a [B, T, in] input, the model output not seen by the engine.

``F.linear`` with a bias on [B, T, in] computes ``addmm`` on the [B*T, in] rows and views the result back to
[B, T, out]. Where the loss is computed inside ``forward`` (stock Hugging Face heads with a bias: Phi, GPT-J,
CodeGen; a user's model returning its loss), the engine read that view as the loop's reshape of a [B*T, out]
model output: the per-sample losses, alpha and the self-check were unavailable ("the model output (32, 100)
does not have the batch's 4 samples"). Checked here against float64 brute force: the per-sample losses and
alpha (QUANTITIES.md's fit at theta_t and theta_{t+1} on the same batch), the self-check passing.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import cockpit_lite
from reference import alpha_of_step

B, T, D = 4, 6, 5


class LossInForward(nn.Module):
    """A sequence regressor that returns its own MSE; its head is a biased Linear on [B, T, D]."""

    def __init__(self, crit):
        super().__init__()
        self.crit = crit
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x, y):
        return self.crit(self.head(torch.tanh(self.body(x))), y)


def _user_case():
    torch.manual_seed(0)
    crit = nn.MSELoss()
    model = LossInForward(crit)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, T, D, generator=g), torch.randn(B, T, 3, generator=g)

    def shares(m):  # l_i: sample i's share of the batch's mean, times B
        return [B * ((m.head(torch.tanh(m.body(x[i:i + 1].double()))) - y[i:i + 1].double()) ** 2).sum() / y.numel()
                for i in range(B)]

    return model, crit, (lambda m: m(x, y)), shares


def _hf_case(name):
    transformers = pytest.importorskip("transformers")
    V = 50
    torch.manual_seed(0)
    if name == "phi":
        model = transformers.PhiForCausalLM(transformers.PhiConfig(
            vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=32, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))
    else:
        model = transformers.GPTJForCausalLM(transformers.GPTJConfig(
            vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32, rotary_dim=4, resid_pdrop=0.0,
            embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (B, T), generator=g)
    labels = x.clone()
    labels[0, 4:] = -100  # padding: the mean is over the tokens left
    n = int((labels[:, 1:] != -100).sum())

    def shares(m):  # l_i = (B / N) * sum of sequence i's token losses (N: the batch's tokens counted)
        return [B / n * nn.functional.cross_entropy(m(input_ids=x[i:i + 1]).logits[0, :-1], labels[i, 1:],
                                                     ignore_index=-100, reduction="sum") for i in range(B)]

    return model, None, (lambda m: m(input_ids=x, labels=labels).loss), shares


@pytest.mark.parametrize("case", ["loss_in_forward", "phi", "gptj"])
def test_alpha_and_the_self_check_against_brute_force(tmp_path, case):
    model, crit, loss_of, shares = _user_case() if case == "loss_in_forward" else _hf_case(case)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    snaps = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with cockpit_lite.watch(model, opt, loss_fn=crit, logdir=tmp_path / "run",
                                quantities={"alpha": "every", "norm_test": "every"}):
            for _ in range(2):  # the same batch twice: step 0's far end is step 1's start
                snaps.append(copy.deepcopy(model.state_dict()))
                opt.zero_grad()
                loss_of(model).backward()
                opt.step()
    run = cockpit_lite.load(tmp_path / "run")
    first = run.records[0]
    assert first["data"]["persample_check"]["status"] == "passed", first["data"]["persample_check"]
    assert run.reasons("alpha") == {}

    assert run.series("alpha")[1][0] == pytest.approx(alpha_of_step(model, snaps, shares)[0], abs=1e-3)
