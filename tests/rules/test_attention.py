"""scaled_dot_product_attention under the paper's default rule: queries and keys at their means.

The reference detaches q and k, so the oracles see exactly the value path the
rule propagates. The linearised option is checked in tests/test_transformers_rules.py.
"""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, randn

aten = torch.ops.aten
q, k, v = randn(2, 2, 4, 3, seed=1), randn(2, 2, 4, 3, seed=2), randn(2, 2, 4, 3, seed=3)
k_shared, v_shared = randn(2, 1, 4, 3, seed=4), randn(2, 1, 4, 3, seed=5)
padding = torch.tensor([True, True, True, False]).expand(2, 1, 4, 4)


def values_only(query, key, value, *args, **kwargs):
    """SDPA with queries and keys held at their means: the function the paper's rule linearises."""
    return aten.scaled_dot_product_attention.default(query.detach(), key.detach(), value, *args, **kwargs)


SAMPLES = [
    Sample(aten.scaled_dot_product_attention.default, (act(q), act(k), act(v)), reference=values_only,
           name="qkv"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), None, 0.0, True), reference=values_only,
           name="causal"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), padding), reference=values_only,
           name="padding"),
    Sample(aten.scaled_dot_product_attention.default, (q, act(k_shared), act(v_shared)),
           {"enable_gqa": True, "scale": 0.5}, reference=values_only, name="gqa"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_attention_dropout_is_rejected() -> None:
    with pytest.raises(ValueError, match="model.eval"):
        check_sample(Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), None, 0.1)), "diag")
