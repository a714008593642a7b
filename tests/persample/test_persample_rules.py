"""The layer-rule table (cockpit_lite/persample/rules.py): which rule serves which call, first match wins;
a module no rule serves goes to the torch.func fallback. (Each rule's values are tested against per-sample
autograd loops in test_persample_view.py and test_real_models.py.)"""

import pytest
import torch
from torch import nn

from cockpit_lite.persample.rules import RULES, rule_for


@pytest.mark.parametrize("module, x, expected", [
    (nn.Linear(4, 3), torch.zeros(2, 4), "linear"),
    (nn.Conv2d(3, 5, 3), torch.zeros(2, 3, 8, 8), "conv"),
    (nn.Conv2d(3, 5, 3), torch.zeros(3, 8, 8), None),  # unbatched input: no batch dimension to split
    (nn.Conv1d(3, 5, 3), torch.zeros(2, 3, 8), "conv"),
    (nn.Embedding(10, 4), torch.zeros(2, 5, dtype=torch.long), "embedding"),
    (nn.Embedding(10, 4, max_norm=1.0), torch.zeros(2, 5, dtype=torch.long), None),  # renormalises in place
    (nn.LayerNorm(4), torch.zeros(2, 4), "layer_norm"),
    (nn.GroupNorm(2, 4), torch.zeros(2, 4, 3, 3), "group_norm"),
    (nn.BatchNorm2d(4), torch.zeros(2, 4, 3, 3), "batch_norm"),
    (nn.MultiheadAttention(4, 2, batch_first=True), torch.zeros(2, 3, 4), "attention"),
    (nn.MultiheadAttention(4, 2, add_bias_kv=True), torch.zeros(3, 2, 4), None),  # the fallback serves it
    (nn.PReLU(), torch.zeros(2, 4), None),
])
def test_rule_for_each_layer_type(module, x, expected):
    rule = rule_for(module, x)
    assert (rule.name if rule is not None else None) == expected


def test_rule_names_are_unique():
    names = [r.name for r in RULES]
    assert len(names) == len(set(names))
