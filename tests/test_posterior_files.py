"""Posterior files: every structure saves to one safetensors file and loads back exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_posteriors import STRUCTURES, cnn, layer_posterior, mlp

import fxstream
from fxstream import Diagonal, FxstreamError, KFAC, LowRank, Mixed, PosteriorMismatchError


def _all_layers(kind: str, model: torch.nn.Module, seed: int = 3) -> fxstream.Posterior:
    """A posterior of one structure over every layer of ``model`` (a Mixed of the per-layer ones)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layers = sorted({n.rpartition(".")[0] for n in shapes})
    parts = [layer_posterior(kind, f"{layer}.weight", f"{layer}.bias", shapes, g, 0.05)[0] for layer in layers]
    return parts[0] if len(parts) == 1 else Mixed(*parts)


def _assert_same_covariances(loaded: fxstream.Posterior, original: fxstream.Posterior) -> None:
    assert type(loaded) is type(original)
    assert loaded.parameter_names() == original.parameter_names()
    for name in original.parameter_names():
        a, b = original.covariance(name), loaded.covariance(name)
        assert (b.kind, b.shape, len(b.tensors)) == (a.kind, a.shape, len(a.tensors)), name
        for x, y in zip(a.tensors, b.tensors):
            assert y.dtype == x.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("kind", STRUCTURES)
@pytest.mark.parametrize("net", ["mlp", "cnn"])
def test_every_structure_round_trips_exactly(kind: str, net: str, tmp_path: Path) -> None:
    model = mlp() if net == "mlp" else cnn()
    posterior = _all_layers(kind, model)
    path = tmp_path / "posterior.safetensors"
    posterior.save(path)
    loaded = fxstream.load_posterior(path, model)
    _assert_same_covariances(loaded, posterior)
    x = torch.randn(4, 5, dtype=torch.float64) if net == "mlp" else torch.randn(4, 2, 5, 5, dtype=torch.float64)
    for structure in ("diag", "full"):
        before = fxstream.streamline(model, posterior, activation_cov=structure, backend="eager")(x)
        after = fxstream.streamline(model, loaded, activation_cov=structure, backend="eager")(x)
        assert torch.equal(before.mean, after.mean) and torch.equal(before.var, after.var)


def test_a_layers_joint_block_is_stored_once_and_shared_again(tmp_path: Path) -> None:
    model = mlp()
    posterior = _all_layers("dense_joint", model)
    posterior.save(tmp_path / "p.safetensors")
    with safe_open(str(tmp_path / "p.safetensors"), "pt") as file:
        assert len(list(file.keys())) == 3  # one (weight, bias) block per layer
        structure = json.loads(file.metadata()["structure"])
    assert structure["type"] == "Mixed" and [p["type"] for p in structure["parts"]] == ["Dense"] * 3
    loaded = fxstream.load_posterior(tmp_path / "p.safetensors")
    assert loaded.covariance("0.weight").tensors[0] is loaded.covariance("0.bias").tensors[0]


def test_names_and_dtypes_are_kept_and_float32_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)).eval()
    posterior = Diagonal({n: torch.rand_like(p) * 1e-2 for n, p in model.named_parameters()})
    posterior.save(tmp_path / "d.safetensors")
    with safe_open(str(tmp_path / "d.safetensors"), "pt") as file:
        assert sorted(file.keys()) == sorted(n for n, _ in model.named_parameters())
    loaded = fxstream.load_posterior(tmp_path / "d.safetensors", model)
    _assert_same_covariances(loaded, posterior)


def test_kfac_eigen_form_and_lowrank_from_samples_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    p, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    eigen = KFAC.from_eigen({"w": [(q, torch.rand(3, generator=g)), (p, torch.rand(4, generator=g))]}, 2.0, 3.0,
                            damping=True, shapes={"w": (3, 4)})
    swag = LowRank.from_samples({"v": torch.randn(5, 3, 4, generator=g)}, rank=3)
    mixed = Mixed(eigen, swag)
    mixed.save(tmp_path / "m.safetensors")
    _assert_same_covariances(fxstream.load_posterior(tmp_path / "m.safetensors"), mixed)


def test_a_plans_posterior_round_trips(tmp_path: Path) -> None:
    """A posterior type without a file structure of its own (the planner's choice) keeps its covariances."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().eval()
    g = torch.Generator().manual_seed(4)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    kfac = Mixed(layer_posterior("kfac", "0.weight", "0.bias", shapes, g, 0.05)[0],
                 layer_posterior("kfac", "2.weight", "2.bias", shapes, g, 0.05)[0])
    plan = fxstream.plan(model, torch.randn(4, 4, dtype=torch.float64), kfac, "1MiB")
    plan.posterior.save(tmp_path / "plan.safetensors")
    loaded = fxstream.load_posterior(tmp_path / "plan.safetensors", model)
    assert loaded.parameter_names() == plan.posterior.parameter_names()
    for name in loaded.parameter_names():
        a, b = plan.posterior.covariance(name), loaded.covariance(name)
        assert a.kind == b.kind and all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors))
    x = torch.randn(5, 4, dtype=torch.float64)
    before = fxstream.streamline(model, plan.posterior, backend="eager")(x)
    after = fxstream.streamline(model, loaded, backend="eager")(x)
    assert torch.equal(before.var, after.var)


def test_a_posterior_that_does_not_fit_names_the_parameter(tmp_path: Path) -> None:
    model = mlp()
    _all_layers("kfac", model).save(tmp_path / "k.safetensors")
    wider = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3)).double()
    with pytest.raises(PosteriorMismatchError, match="'0.weight'"):
        fxstream.load_posterior(tmp_path / "k.safetensors", wider)
    renamed = torch.nn.Sequential()
    renamed.add_module("first", torch.nn.Linear(5, 7))
    with pytest.raises(PosteriorMismatchError, match="'0.weight', which the model does not have"):
        fxstream.load_posterior(tmp_path / "k.safetensors", renamed)


def test_files_that_are_not_posteriors_are_clear_errors(tmp_path: Path) -> None:
    torch.save({"0.weight": torch.ones(7, 5)}, tmp_path / "old.pt")
    with pytest.raises(FxstreamError, match="not a posterior file"):
        fxstream.load_posterior(tmp_path / "old.pt")
    save_file({"0.weight": torch.ones(7, 5)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FxstreamError, match="not an fxstream posterior"):
        fxstream.load_posterior(tmp_path / "plain.safetensors")
