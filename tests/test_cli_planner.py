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
