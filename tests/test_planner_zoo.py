"""fxstream.plan takes the zoo's models that streamline takes: CNNs (torchvision, timm) and tiny transformers.

Each model is planned eagerly at its catalogue size (one 32x32 image, or two 8-token
sequences) with a posterior over two of its layers, and the plan's calibration, the
planner's own predictive run, must be the streamlined model's predictive at the
same posterior. Two inputs were crashes: a one-image example (Dynamo cannot make a
size-1 dimension symbolic; capture now widens it to two copies, and the plan is for
the caller's batch of 1) and GPT-2's key/value cache (the planner captured every
output, so the first covariance it calibrated on was a cache tensor; it now captures
the output streamline predicts).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fxstream
from fxstream.planner.plan import Planner, choose
from fxstream.zoo.catalogue import available, catalogue

# (zoo entry, the parameters of the posterior): the head plus one layer early in the network.
CASES = {
    "torchvision/resnet18": ["layer1.0.conv1.weight", "fc.weight", "fc.bias"],
    "torchvision/mobilenet_v3_small": ["features.1.block.0.0.weight", "classifier.3.weight", "classifier.3.bias"],
    "timm/convnext_atto": ["stages.0.blocks.0.conv_dw.weight", "head.fc.weight", "head.fc.bias"],
    "transformers/gpt2": ["transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                          "transformer.h.1.mlp.c_proj.weight"],  # its head is tied to the token embedding
    "transformers/llama": ["model.layers.0.mlp.down_proj.weight", "lm_head.weight"],
    "transformers/bert": ["bert.encoder.layer.0.output.dense.weight", "classifier.weight", "classifier.bias"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(CASES))
def test_plan_takes_the_zoo_model_and_calibrates_on_what_streamline_runs(name: str) -> None:
    source = name.split("/")[0]
    if not available(source):
        pytest.skip(f"needs {source}")
    built = {entry.name: entry for entry in catalogue((source,))}[name].build()
    model, args = built.model, built.args
    parameters = dict(model.named_parameters())
    g = torch.Generator().manual_seed(0)
    posterior = fxstream.Diagonal({n: 1e-4 * (0.5 + torch.rand(parameters[n].shape, generator=g))
                                   for n in CASES[name]})
    planner = Planner(model, args, posterior, {(0, 0): "batch"}, structures=("diag",), output=built.output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = choose(planner, "1GiB")
    assert plan.sizes["batch"] == args[0].shape[0]  # the caller's batch, even where capture widened it
    assert plan.total_at() <= plan.budget
    chosen = frozenset((row.layer, row.structure) for row in plan.layers if row.structure != "none")
    assert CASES[name][-1].rpartition(".")[0] in {layer for layer, _ in chosen}
    # A layer left out (at random init, convnext's layer scale of 1e-6 leaves its first block's
    # share of the variance at 1e-16) is named in a warning.
    left = [row.layer for row in plan.layers if row.structure == "none"]
    told = " ".join(str(w.message) for w in caught if issubclass(w.category, fxstream.FxstreamWarning))
    assert all(layer in told for layer in left)
    calibrated = planner.output_variance(chosen, plan.activation_cov)
    pred = fxstream.streamline(model, plan.posterior, activation_cov=plan.activation_cov, backend="eager",
                               output=built.output)(*args)
    # A widened capture calibrates on two copies of the example: each copy is the streamlined predictive.
    copies = calibrated.reshape(-1, pred.var.numel())
    assert copies.shape[0] == planner.sym.example_sizes["batch"] // args[0].shape[0]
    for copy in copies:
        torch.testing.assert_close(copy, pred.var.reshape(-1), rtol=1e-5, atol=0)
