"""Every registered rule has a numerical test: the rule table and the harness's sample tables agree."""

from __future__ import annotations

from pathlib import Path

from harness import sample_tables

from fxstream.rules import RULES, rule_for

HERE = Path(__file__).parent


def _sample_tables() -> dict[str, list]:
    return sample_tables(HERE)


def test_every_registered_op_has_a_sample() -> None:
    tables = _sample_tables()
    covered = {sample.op for samples in tables.values() for sample in samples}
    missing = sorted(f"{op} (rule '{rule.name}' in rules/{rule.family}.py)"
                     for op, rule in RULES.items() if op not in covered)
    assert not missing, (
        "registered rules without a numerical test; add a Sample to "
        "tests/rules/test_<family>.py for: " + ", ".join(missing)
    )


def test_every_sample_names_a_registered_op() -> None:
    stale = sorted({str(s.op) for samples in _sample_tables().values() for s in samples if rule_for(s.op) is None})
    assert not stale, f"samples for ops that have no rule: {stale}"


def test_the_pointwise_fallback_has_samples() -> None:
    """Ops without a registered rule that the pointwise fallback covers are sampled in test_pointwise.py."""
    fallback = [s.op for s in _sample_tables()["test_pointwise"] if s.op not in RULES]
    assert len(fallback) >= 8 and all(rule_for(op).family == "pointwise" for op in fallback)
