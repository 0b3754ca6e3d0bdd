"""products="linearised": every rule that claims exact product moments drops exactly its second-order term.

Each sample of a bilinear op (``exact=True`` in the family modules) is checked
against the first-order oracle J S J^T alone, so the option leaves the linear
part of every such rule untouched and removes nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import cases, check_sample, sample_tables

BILINEAR_SAMPLES = [s for table in sample_tables(Path(__file__).parent, skip=__file__).values() for s in table if s.exact]


def test_there_are_bilinear_samples_with_two_uncertain_factors() -> None:
    assert sum(1 for s in BILINEAR_SAMPLES if s.monte_carlo) >= 3


@pytest.mark.parametrize("sample, structure", cases(BILINEAR_SAMPLES))
def test_linearised_products_match_the_first_order_oracle(sample, structure: str) -> None:
    check_sample(sample, structure, options={"products": "linearised"})
