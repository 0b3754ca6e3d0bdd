"""The command line as something to deploy: version, devices, JSON, exit codes, errors, posterior files, names."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import fxstream
from fxstream import cli, demo
from fxstream.errors import FxstreamWarning, UnsupportedOpError

ROOT = Path(__file__).resolve().parents[1]

TINY = """
import torch

def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    return model, torch.randn(4, 6)
"""


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch) -> str:
    """A ``module:callable`` target importable by this process; a fresh module name per test."""
    name = f"tiny_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(TINY))
    monkeypatch.syspath_prepend(str(tmp_path))
    return f"{name}:make"


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"fxstream {fxstream.__version__}")


@pytest.mark.parametrize("command", [["demo"], ["plan", "mlp", "--budget", "1MiB"], ["inspect", "mlp"]])
def test_every_command_takes_a_device(command: list[str]) -> None:
    assert cli.build_parser().parse_args([*command, "--device", "cpu"]).device == "cpu"
    assert cli.build_parser().parse_args([*command, "--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit) as done:
        cli.build_parser().parse_args([*command, "--device", "tpu"])
    assert done.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(capsys) -> None:
    assert cli.main(["inspect", "mlp", "--device", "cuda"]) == 1
    assert "CUDA is not available" in capsys.readouterr().err


def test_device_moves_model_and_inputs(tiny: str, capsys) -> None:
    assert cli.main(["inspect", tiny, "--device", "cpu", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kept"] > 0


def test_inspect_json_names_parameters(tiny: str, capsys) -> None:
    assert cli.main(["inspect", tiny, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    ops = {node["op"] for node in shown["nodes"]}
    assert {"parameter 0.weight", "parameter 0.bias", "parameter 2.weight", "parameter 2.bias", "input 0"} <= ops
    kept = [node for node in shown["nodes"] if node["status"] == "kept"]
    assert {node["rule"] for node in kept} >= {"linear", "elementwise", "source"}
    assert shown["activation_cov"] == "diag" and shown["kept"] == len(kept)


def test_inspect_table_names_parameters(tiny: str, capsys) -> None:
    assert cli.main(["inspect", tiny]) == 0
    out = capsys.readouterr().out
    assert "parameter 0.weight" in out and "parameter 2.bias" in out and "size batch" in out


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_inspect_code_is_aten_ops_named_after_parameters(tiny: str, capsys, structure: str) -> None:
    assert cli.main(["inspect", tiny, "--format", "code", "--activation-cov", structure]) == 0
    code = capsys.readouterr().out
    signature = next(line for line in code.splitlines() if line.startswith("def forward"))
    for name in ("p_0_weight", "p_0_bias", "p_2_weight", "input_0", "cov_0_weight", "cov_2_bias"):
        assert name in signature
    assert "fxstream_rules" not in code and "torch.ops.aten." in code
    assert "# cov_linear: covariance of linear by the linear rule" in code


def test_inspect_code_view_computes_what_the_graph_computes(tiny: str) -> None:
    """The displayed ATen trace is the rewritten graph: run both at the example input, same outputs."""
    from fxstream.backend import StreamlineOptions
    from fxstream.pipeline import rewrite
    from fxstream.planner import inspect_cli
    from fxstream.planner.symbolic import capture_symbolic
    from fxstream.planner.targets import load

    target = load(tiny)
    posterior = fxstream.Diagonal({n: torch.rand_like(p) * 1e-2 for n, p in target.model.named_parameters()})
    sym = capture_symbolic(target.model, target.args, target.dims)
    paired = rewrite(sym.captured, StreamlineOptions(posterior=posterior, model=target.model)).paired
    code = inspect_cli.aten_code(paired, sym, inspect_cli.placeholder_names(sym))
    namespace = {"torch": torch}
    exec(textwrap.dedent(code[code.index("def forward"):]), namespace)  # noqa: S102 - the code we generated
    inputs = sym.graph_inputs(sym.example_sizes, lambda p, shape: p.tensor)
    buffers = [getattr(paired.graph_module, n.target) for n in paired.graph_module.graph.nodes
               if n.op == "get_attr" and isinstance(getattr(paired.graph_module, n.target), torch.Tensor)]
    shown = namespace["forward"](None, *inputs, *buffers)
    expected = paired.graph_module(*inputs)
    assert len(shown) == len(expected)
    for a, b in zip(shown, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_plan_json_flag(tiny: str, capsys) -> None:
    assert cli.main(["plan", tiny, "--budget", "1MiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget"] == 2**20


def test_demo_json_is_pure_json_on_stdout(monkeypatch, capsys) -> None:
    rows = [demo.Row("MAP", 0.9, 0.3, 0.05, 0.9, 0.2, 0.8, 1e-3),
            demo.Row("fxstream (eager, probit)", 0.9, 0.25, 0.02, 0.7, 0.1, 0.85, 2e-3, 1.5)]
    seen = {}

    def evaluate(seed, epochs, backend, repeats, device="cpu", log=print):
        seen.update(device=device)
        log("a note between the steps")
        return rows, SimpleNamespace(prior_precision=1.0, at_edge=False)

    monkeypatch.setattr(demo, "evaluate", evaluate)
    assert cli.main(["demo", "--json", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["rows"] == [vars(r) for r in rows] and result["epochs"] == 2 and result["device"] == "cpu"
    assert "a note between the steps" in captured.err and seen["device"] == "cpu"


class _Raises:
    """A command whose run raises the exception the test puts in ``error``."""

    error: BaseException = RuntimeError()

    @staticmethod
    def register(subparsers):
        subparsers.add_parser("raise").set_defaults(run=_Raises.run)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        raise _Raises.error


@pytest.fixture
def raising(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, _Raises))
    return _Raises


def test_ctrl_c_exits_130_with_one_line(raising, capsys) -> None:
    raising.error = KeyboardInterrupt()
    assert cli.main(["raise"]) == 130
    assert capsys.readouterr().err.strip() == "fxstream: interrupted"


def test_fxstream_errors_print_whole_others_one_line(raising, capsys) -> None:
    raising.error = UnsupportedOpError([("aten.foo.default", "block (Block)", "no rule"),
                                        ("aten.bar.default", "head (Linear)", "")])
    assert cli.main(["raise"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fxstream: error: UnsupportedOpError:")
    assert "'aten.foo.default' in block (Block)" in err and "'aten.bar.default' in head (Linear)" in err
    assert "--debug" in err
    raising.error = RuntimeError("first\nsecond")
    assert cli.main(["raise"]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RuntimeError: first" in err and "second" not in err


def test_posterior_files_of_any_structure(tiny: str, tmp_path: Path, capsys) -> None:
    model = _model()
    g = torch.Generator().manual_seed(0)

    def spd(n):
        a = torch.randn(n, n, generator=g)
        return a @ a.t() / n * 1e-2 + 1e-3 * torch.eye(n)

    kfac = fxstream.KFAC({"0.weight": (spd(16), spd(6)), "0.bias": (spd(16),)})
    posterior = fxstream.Mixed(kfac, fxstream.Diagonal({"2.weight": torch.full((3, 16), 1e-3)}))
    posterior.save(tmp_path / "p.safetensors")
    assert cli.main(["inspect", tiny, "--posterior", str(tmp_path / "p.safetensors"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    sources = {n["op"] for n in shown["nodes"] if n["rule"] == "source"}
    assert sources == {"parameter 0.weight", "parameter 0.bias", "parameter 2.weight"}
    assert cli.main(["plan", tiny, "--posterior", str(tmp_path / "p.safetensors"), "--budget", "1MiB",
                     "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {row["layer"] for row in plan["layers"]} == {"0", "2"}


def test_old_posterior_files_still_read(tiny: str, tmp_path: Path, capsys) -> None:
    torch.save({"2.weight": torch.full((3, 16), 1e-3)}, tmp_path / "old.pt")
    assert cli.main(["inspect", tiny, "--posterior", str(tmp_path / "old.pt"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert {n["op"] for n in shown["nodes"] if n["rule"] == "source"} == {"parameter 2.weight"}


def test_posterior_that_does_not_fit_names_the_parameter(tiny: str, tmp_path: Path, capsys) -> None:
    fxstream.Diagonal({"2.weight": torch.ones(3, 15)}).save(tmp_path / "wrong.safetensors")
    assert cli.main(["plan", tiny, "--posterior", str(tmp_path / "wrong.safetensors"), "--budget", "1MiB"]) == 1
    err = capsys.readouterr().err
    assert "PosteriorMismatchError" in err and "'2.weight'" in err and "(3, 15)" in err
    (tmp_path / "junk.bin").write_bytes(b"not a posterior")
    assert cli.main(["inspect", tiny, "--posterior", str(tmp_path / "junk.bin")]) == 1
    assert "posterior.save" in capsys.readouterr().err


def test_variance_with_a_posterior_file_warns(tiny: str, tmp_path: Path, capsys) -> None:
    fxstream.Diagonal({"2.weight": torch.full((3, 16), 1e-3)}).save(tmp_path / "p.safetensors")
    assert cli.main(["inspect", tiny, "--posterior", str(tmp_path / "p.safetensors"), "--variance", "0.5"]) == 0
    assert "fxstream: warning: --variance has no effect with --posterior" in capsys.readouterr().err


def test_targets_import_from_the_current_directory(tmp_path: Path) -> None:
    """The installed ``fxstream`` script puts its own folder first on sys.path, not the working directory."""
    work, bin_dir = tmp_path / "work", tmp_path / "bin"
    work.mkdir()
    bin_dir.mkdir()
    (work / "here_model.py").write_text(textwrap.dedent(TINY))
    (bin_dir / "fxstream_script.py").write_text(
        f"import sys\nsys.path.insert(1, {str(ROOT)!r})\nfrom fxstream.cli import main\nsys.exit(main())\n")
    done = subprocess.run([sys.executable, str(bin_dir / "fxstream_script.py"), "inspect", "here_model:make",
                           "--json"], capture_output=True, text=True, cwd=work, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["kept"] > 0


def test_options_that_do_nothing_warn() -> None:
    model = _model()
    posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
    with pytest.warns(FxstreamWarning, match="sigma_noise"):
        fxstream.streamline(model, posterior, likelihood="classification", sigma_noise=0.1, backend="eager")
    with pytest.warns(FxstreamWarning, match="without budget="):
        fxstream.streamline(model, posterior, example_inputs=(torch.randn(2, 6),), backend="eager")
    with pytest.warns(FxstreamWarning, match="residual='linearised'"):
        fxstream.streamline(model, posterior, residual="linearised", activation_cov="full", backend="eager")
    with pytest.warns(FxstreamWarning, match="gates='linearised'"):
        fxstream.streamline(model, posterior, gates="linearised", activation_cov="full", backend="eager")
    with pytest.warns(FxstreamWarning, match="interpolation='independent'"):
        fxstream.streamline(model, posterior, interpolation="independent", activation_cov="full", backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FxstreamWarning)
        fxstream.streamline(model, posterior, likelihood="regression", sigma_noise=0.1, backend="eager")


def test_plan_warns_about_a_layer_it_leaves_deterministic() -> None:
    model = _model()
    posterior = fxstream.Diagonal({n: torch.full_like(p, 1e-3) for n, p in model.named_parameters()})
    cheapest = fxstream.plan(model, torch.randn(4, 6), posterior, "1GiB", activation_cov=("diag",))
    assert all(row.structure != "none" for row in cheapest.layers)
    with pytest.warns(FxstreamWarning, match="leaves 1 of the posterior's 2 layers deterministic") as caught:
        planned = fxstream.plan(model, torch.randn(4, 6), posterior, cheapest.total_at() - 1,
                                activation_cov=("diag",))
    left = [row for row in planned.layers if row.structure == "none"]
    assert len(left) == 1
    assert f"{left[0].layer} ({left[0].reason})" in str(caught[0].message)
