"""softmax and log_softmax, linearised at the mean."""

from __future__ import annotations

import pytest
import torch

from harness import Sample, act, cases, check_sample, randn

aten = torch.ops.aten
logits, scores = randn(3, 5, seed=1), randn(2, 3, 4, seed=2)

SAMPLES = [
    Sample(aten.softmax.int, (act(logits), -1)),
    Sample(aten.softmax.int, (act(scores), 1), name="middle-dim"),
    Sample(aten._softmax.default, (act(scores), -1, False)),
    Sample(aten.log_softmax.int, (act(logits), 1)),
    Sample(aten._log_softmax.default, (act(scores), 2, False)),
]


@pytest.mark.parametrize("sample, structure", cases(SAMPLES))
def test_rule(sample: Sample, structure: str) -> None:
    check_sample(sample, structure)


def test_the_paper_rule_finds_attention_probabilities_through_casts_dropout_and_reshapes() -> None:
    """BLOOM's eager attention: softmax, a cast, eval dropout, a view to (B*H, T, S), then bmm with the values."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxstream.rules.patterns import mean_only_nodes

    def bloom_like(scores: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(scores, -1, dtype=torch.float32).to(values.dtype)
        p = torch.nn.functional.dropout(p, 0.1, training=False)
        return torch.bmm(p.view(4, 3, 3), values * 2)  # values computed in the graph: an activation

    def classifier(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, -1).view(4, 3, 3) @ weight  # a softmax times a parameter: not attention

    graph = make_fx(bloom_like, pre_dispatch=True)(torch.randn(2, 2, 3, 3), torch.randn(4, 3, 5)).graph
    held = mean_only_nodes(graph, {"attention": "paper"})
    assert [n.target for n in held] == [aten.softmax.int]
    assert not mean_only_nodes(graph, {"attention": "linearised"})
    graph = make_fx(classifier, pre_dispatch=True)(torch.randn(2, 2, 3, 3), torch.randn(3, 5)).graph
    assert not mean_only_nodes(graph, {"attention": "paper"})
