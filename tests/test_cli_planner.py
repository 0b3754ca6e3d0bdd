"""``fxstream plan`` and ``fxstream inspect`` run as a user runs them: a subprocess, output and exit code."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def fxstream(*args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = None
    if path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": str(path)}
    return subprocess.run([sys.executable, "-m", "fxstream.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("target")
    (folder / "tiny_model.py").write_text(textwrap.dedent("""
        import torch

        def make():
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
            return model, torch.randn(4, 6)
    """))
    return folder


def test_plan_json_fits_budget_and_names_formulas(tiny_target: Path) -> None:
    done = fxstream("plan", "tiny_model:make", "--budget", "64KiB", "--batch", "32", "--format", "json",
                    path=tiny_target)
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["total_bytes"] <= 64 * 1024
    assert "batch" in plan["total_bytes_formula"]
    assert {row["layer"] for row in plan["layers"]} == {"0", "2"}
    assert plan["limits"]["batch"] >= 32
    assert 0 < plan["fidelity"] <= 1


def test_plan_table_for_builtin_mlp() -> None:
    done = fxstream("plan", "mlp", "--budget", "2MiB", "--batch", "16")
    assert done.returncode == 0, done.stderr
    for word in ("layer", "structure", "cov bytes formula", "total (static + peak)", "max batch"):
        assert word in done.stdout


def test_infeasible_budget_is_one_line_exit_1(tiny_target: Path) -> None:
    done = fxstream("plan", "tiny_model:make", "--budget", "100", "--batch", "32", path=tiny_target)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("fxstream: error")]
    assert len(lines) == 1 and "BudgetError" in lines[0] and "needs" in lines[0]
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [
    ["plan", "mlp"],                                  # --budget missing
    ["plan", "mlp", "--budget", "2 lightyears"],
    ["plan", "mlp", "--budget", "1GiB", "--batch", "0"],
    ["inspect", "mlp", "--format", "pdf"],
])
def test_bad_arguments_exit_2(args: list[str]) -> None:
    done = fxstream(*args)
    assert done.returncode == 2
    assert "usage:" in done.stderr


def test_unknown_target_exit_1() -> None:
    done = fxstream("plan", "no_such_model", "--budget", "1GiB")
    assert done.returncode == 1
    assert "unknown target 'no_such_model'" in done.stderr and "Traceback" not in done.stderr


def test_inspect_formats(tiny_target: Path) -> None:
    table = fxstream("inspect", "tiny_model:make", path=tiny_target)
    assert table.returncode == 0, table.stderr
    assert "cov_linear" in table.stdout and "kept" in table.stdout
    dot = fxstream("inspect", "tiny_model:make", "--format", "dot", path=tiny_target)
    assert dot.returncode == 0 and dot.stdout.startswith("digraph fxstream")
    code = fxstream("inspect", "tiny_model:make", "--format", "code", "--activation-cov", "full", path=tiny_target)
    assert code.returncode == 0 and "cov_linear" in code.stdout and "def forward" in code.stdout


def test_inspect_shows_the_graph_of_the_rule_options(tmp_path: Path) -> None:
    """--residual linearised (like every rule option flag) changes the rewritten graph that is shown."""
    (tmp_path / "residual_model.py").write_text(textwrap.dedent("""
        import torch

        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.up, self.down = torch.nn.Linear(6, 12), torch.nn.Linear(12, 6)

            def forward(self, h):
                return h + self.down(torch.tanh(self.up(h)))

        def make():
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(6, 6), Block()), torch.randn(4, 6)
    """))
    plain = fxstream("inspect", "residual_model:make", path=tmp_path)
    joined = fxstream("inspect", "residual_model:make", "--residual", "linearised", path=tmp_path)
    assert plain.returncode == 0 and joined.returncode == 0, joined.stderr
    assert "residual_join" not in plain.stdout and "residual_join" in joined.stdout


@pytest.fixture(scope="module")
def token_target(tmp_path_factory) -> Path:
    """A token model (ids -> embedding (11 x 6) -> tanh -> linear 6 -> 5): dim 1 of its input is "seq"."""
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "token_model.py").write_text(textwrap.dedent("""
        import torch

        class Tokens(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.emb = torch.nn.Embedding(11, 6)
                self.head = torch.nn.Linear(6, 5)

            def forward(self, ids):
                return self.head(torch.tanh(self.emb(ids)))

        def make():
            torch.manual_seed(0)
            return Tokens(), torch.randint(0, 11, (2, 4))
    """))
    return folder


def plan_json(*args: str, path: Path) -> dict:
    done = fxstream("plan", "token_model:make", "--budget", "1MiB", "--format", "json", "--activation-cov", "diag",
                    *args, path=path)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_plan_for_a_sequence_length(token_target: Path) -> None:
    """--seq 7 --batch 3: every size is costed at 3 x 7 tokens. Closed forms (float32, diagonal activations): the
    embedding's output variances 3*7*6 floats, the head's 3*7*5; the head's variance GEMMs
    s @ (W^2 + V)^T and x^2 @ V^T, 2 * (2 * 21 * 6 * 5) FLOPs; posteriors 11*6 and 5*6 + 5 floats."""
    plan = plan_json("--batch", "3", "--seq", "7", path=token_target)
    assert plan["sizes"] == {"batch": 3, "seq": 7}
    layers = {row["layer"]: row for row in plan["layers"]}
    assert layers["emb"]["cov_bytes"] == 3 * 7 * 6 * 4 and layers["head"]["cov_bytes"] == 3 * 7 * 5 * 4
    assert layers["head"]["flops"] == 2 * (2 * 3 * 7 * 6 * 5)
    assert layers["emb"]["posterior_bytes"] == 11 * 6 * 4 and layers["head"]["posterior_bytes"] == (5 * 6 + 5) * 4
    assert plan["deterministic_flops"] == 2 * 3 * 7 * 6 * 5


def test_seq_on_a_model_without_a_sequence_is_an_error(tiny_target: Path) -> None:
    done = fxstream("plan", "tiny_model:make", "--budget", "1MiB", "--seq", "8", path=tiny_target)
    assert done.returncode == 1 and "has no sequence dimension; drop --seq" in done.stderr


def test_plan_reads_the_posterior_file(token_target: Path, tmp_path: Path) -> None:
    """--posterior FILE with the head alone: the embedding is deterministic, so only the head is planned and its
    input carries no variance: one variance GEMM, x^2 @ V^T (2 * 21 * 6 * 5 FLOPs), not two."""
    import torch

    path = tmp_path / "head.pt"
    torch.save({"head.weight": torch.full((5, 6), 1e-2), "head.bias": torch.full((5,), 1e-2)}, path)
    plan = plan_json("--batch", "3", "--seq", "7", "--posterior", str(path), path=token_target)
    assert [row["layer"] for row in plan["layers"]] == ["head"]
    head = plan["layers"][0]
    assert head["parameters"] == ["head.weight", "head.bias"] and head["posterior_bytes"] == (5 * 6 + 5) * 4
    assert head["flops"] == 2 * 3 * 7 * 6 * 5 and head["cov_bytes"] == 3 * 7 * 5 * 4

    torch.save({"head.weights": torch.ones(5, 6)}, path)
    done = fxstream("plan", "token_model:make", "--budget", "1MiB", "--posterior", str(path), path=token_target)
    assert done.returncode == 1 and "head.weights" in done.stderr and "Traceback" not in done.stderr
    path.write_text("not a tensor file")
    done = fxstream("plan", "token_model:make", "--budget", "1MiB", "--posterior", str(path), path=token_target)
    assert done.returncode == 1 and "cannot read the posterior file" in done.stderr
