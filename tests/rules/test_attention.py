"""scaled_dot_product_attention under the paper's default rule: queries, keys and an additive mask at their means.

The reference detaches q, k and the mask, so the oracles see exactly the value
path the rule propagates. Under attention="linearised" the op itself is the
reference; its query/key terms are also checked in tests/test_transformers_rules.py,
an uncertain additive mask (T5's relative position bias, a learned ALiBi) here.
"""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, capability_problem, cases, check_sample, param, randn

aten = torch.ops.aten
q, k, v = randn(2, 2, 4, 3, seed=1), randn(2, 2, 4, 3, seed=2), randn(2, 2, 4, 3, seed=3)
k_shared, v_shared = randn(2, 1, 4, 3, seed=4), randn(2, 1, 4, 3, seed=5)
padding = torch.tensor([True, True, True, False]).expand(2, 1, 4, 4)
bias = randn(2, 2, 4, 4, seed=6)  # an additive mask per sample and head
per_key = randn(2, 1, 1, 4, seed=7)  # one additive entry per sample and key, broadcast over heads and queries
position_bias = randn(1, 2, 4, 4, seed=8)  # T5: a parameter shared by the batch
LINEARISED = {"attention": "linearised"}


def values_only(query, key, value, mask=None, *args, **kwargs):
    """SDPA with queries, keys and the mask held at their means: the function the paper's rule linearises."""
    mask = mask.detach() if isinstance(mask, torch.Tensor) else mask
    return aten.scaled_dot_product_attention.default(query.detach(), key.detach(), value, mask, *args, **kwargs)


SAMPLES = [
    Sample(aten.scaled_dot_product_attention.default, (act(q), act(k), act(v)), reference=values_only,
           name="qkv"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), None, 0.0, True), reference=values_only,
           name="causal"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), padding), reference=values_only,
           name="padding"),
    Sample(aten.scaled_dot_product_attention.default, (q, act(k_shared), act(v_shared)),
           {"enable_gqa": True, "scale": 0.5}, reference=values_only, name="gqa"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), act(bias)), reference=values_only,
           name="uncertain-mask"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), param(position_bias)), reference=values_only,
           name="parameter-mask"),
]
# attention="linearised": the op itself is the reference, the mask's uncertainty goes through the softmax.
LINEARISED_SAMPLES = [
    Sample(aten.scaled_dot_product_attention.default, (act(q), act(k), act(v), act(bias)), name="qkv-mask"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, v, act(bias)), {"scale": 0.5}, name="mask-only"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), act(per_key)), name="broadcast-mask"),
    Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), param(position_bias)), name="parameter-mask"),
    Sample(aten.scaled_dot_product_attention.default, (q, act(k_shared), v_shared, param(position_bias[0])),
           {"enable_gqa": True}, name="gqa-parameter-mask"),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


@pytest.mark.parametrize("sample, structure", cases(LINEARISED_SAMPLES))
def test_linearised_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure, options=LINEARISED)


def test_attention_dropout_is_declined() -> None:
    assert "model.eval" in capability_problem(Sample(aten.scaled_dot_product_attention.default,
                                                     (q, k, act(v), None, 0.1)))


def test_a_parameter_as_query_is_declined_only_where_its_uncertainty_is_read() -> None:
    sample = Sample(aten.scaled_dot_product_attention.default, (param(q[0]), k, act(v)))
    assert capability_problem(sample) is None  # the paper's rule takes queries at their means
    assert "parameter as query" in capability_problem(sample, options=LINEARISED)
    values = Sample(aten.scaled_dot_product_attention.default, (q, k, param(v[0])))
    assert "parameter as query, key or value" in capability_problem(values)


def test_full_covariance_of_an_activation_mask_shared_by_the_batch_is_declined() -> None:
    shared = Sample(aten.scaled_dot_product_attention.default, (q, k, act(v), act(position_bias)))
    assert "activation_cov='diag'" in capability_problem(shared, "full", LINEARISED)
    assert capability_problem(shared, "diag", LINEARISED) is None
    assert capability_problem(shared, "full") is None  # the paper's rule does not read the mask's uncertainty
