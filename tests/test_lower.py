"""The lower pass: the pruned graph traced once to plain ATen, dynamic in batch and sequence length.

Oracle: the pruned graph itself (every covariance node calling its rule), run
on the same inputs. The lowered graph must equal it to float rounding at every
shape. A StreamlinedModel's first capture has a symbolic batch; once an image
size or sequence length changes, one more capture makes those symbolic too,
and it serves every later shape and many threads.
"""

from __future__ import annotations

import threading
import warnings

import pytest
import torch
from torch import nn

import fxstream
from fxstream.passes.lower import is_plain_aten
from test_joins import ResidualMLP

transformers_tests = pytest.importorskip("test_transformers")


def _variances(model: nn.Module, scale: float = 1e-2) -> fxstream.Diagonal:
    return fxstream.Diagonal({n: scale * p.detach().square().mean() * torch.ones_like(p)
                              for n, p in model.named_parameters()})


class SmallCNN(nn.Module):
    """conv -> batch norm -> relu -> conv -> mean over space -> linear: any image size."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)).mean((2, 3)))


class SmallSegmenter(nn.Module):
    """strided conv -> relu -> 1x1 conv -> bilinear upsampling back to the input's size: per-pixel logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(self.body(x), size=x.shape[-2:], mode="bilinear", align_corners=False)


def _case(name: str):
    """(model, posterior, inputs at several shapes, streamline options)."""
    torch.manual_seed(0)
    if name.startswith("residual"):  # residual adds of two activations: their full covariances summed
        model = ResidualMLP().double()
        inputs = [torch.randn(b, 4, dtype=torch.float64) for b in (3, 5, 2)]
        first_order = dict(activation_cov="full", products="linearised", joins="exact")
        return model.eval(), _variances(model), inputs, first_order if name.endswith("joins") else {
            "activation_cov": "full"}
    if name.startswith("mlp"):
        model = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3)).double()
        inputs = [torch.randn(b, 4, dtype=torch.float64) for b in (3, 5, 2)]
    elif name.startswith("cnn"):
        model = SmallCNN().double()
        model.body[1].running_mean.uniform_(-0.5, 0.5)
        model.body[1].running_var.uniform_(0.5, 2.0)
        inputs = [torch.randn(b, 1, h, h, dtype=torch.float64) for b, h in ((2, 6), (3, 7), (5, 5))]
    elif name.startswith("segmentation"):
        model = SmallSegmenter().double()
        inputs = [torch.randn(b, 1, h, w, dtype=torch.float64) for b, h, w in ((2, 8, 8), (3, 10, 12), (2, 9, 7))]
    elif name == "gpt2-full":  # every block parameter, layer norms too: a Jacobian in the norm's weight
        model, _ = transformers_tests.tiny("gpt2", layers=1)
        variances = {n: torch.full_like(p, 1e-4) for n, p in model.named_parameters() if ".h.0." in n}
        inputs = [torch.randint(0, 97, shape) for shape in ((2, 3), (3, 2), (2, 4))]
        return model.eval(), fxstream.Diagonal(variances), inputs, {"activation_cov": "full"}
    elif name == "llama-joins":  # attention and MLP branches joined: index constants recorded at build time
        model, _ = transformers_tests.tiny("llama", layers=2)
        variances = {n: 1e-4 * p.detach().square().mean() * torch.ones_like(p) for n, p in model.named_parameters()
                     if n.endswith("weight") and any(k in n for k in ("v_proj", "o_proj", "mlp"))}
        inputs = [torch.randint(0, 97, shape) for shape in ((2, 8), (3, 5), (4, 11))]
        return model.eval(), fxstream.Diagonal(variances), inputs, {"residual": "linearised", "gates": "linearised"}
    else:
        model, _ = transformers_tests.tiny(name, layers=1)
        variances = transformers_tests.weight_variances(model, 0.05, with_query_key=True)
        inputs = [torch.randint(0, 97, shape) for shape in ((2, 8), (3, 5), (4, 11))]
        return model.eval(), fxstream.Diagonal(variances), inputs, {}
    options = {"activation_cov": "full"} if name.endswith("full") else {}
    return model.eval(), _variances(model), inputs, options


@pytest.mark.parametrize("name", ["mlp", "mlp-full", "residual-full", "residual-joins", "cnn", "cnn-full",
                                  "segmentation", "segmentation-full", "gpt2", "gpt2-full", "llama", "llama-joins"])
def test_lowered_graph_equals_the_rule_graph_at_every_shape(name: str) -> None:
    """The lowered graph equals the rule graph at each of three shapes. The batch is symbolic from the first
    capture; an image size or sequence length that changes is captured once more, symbolic too."""
    model, posterior, inputs, options = _case(name)
    structure = options.get("activation_cov", "diag")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # residual='linearised' names the joins it leaves; not this test's subject
        streamlined = fxstream.streamline(model, posterior, backend="eager", **options)
    for x in inputs:
        streamlined(x)
        graph = streamlined.graphs[-1]
        assert all(is_plain_aten(node) for node in graph.lowered.graph.nodes)
        args = []
        graph.compiled = lambda *a, graph=graph: args.append(a) or graph.lowered(*a)
        lowered = streamlined(x)
        rule_graph = graph.paired.graph_module(*args[0])
        assert lowered.mean.shape[0] == x.shape[0]
        torch.testing.assert_close(lowered.mean, rule_graph[0], rtol=1e-12, atol=0)
        expected = rule_graph[graph.paired.num_outputs]
        torch.testing.assert_close((lowered.cov if structure == "full" else lowered.var).reshape(expected.shape),
                                   expected, rtol=1e-10, atol=1e-300)
    varied = any(x.shape[1:] != inputs[0].shape[1:] for x in inputs)
    assert len(streamlined.graphs) == (2 if varied else 1), "a new shape compiled a new graph"


def test_a_posterior_updated_in_place_is_what_the_lowered_graph_reads() -> None:
    """The lowered graph reads the very tensors the pairing registered, so an in-place update shows."""
    model, posterior, inputs, _ = _case("mlp")
    streamlined = fxstream.streamline(model, posterior, backend="eager")
    before = streamlined(inputs[0]).var
    (graph,) = streamlined.graphs
    buffers = dict(graph.paired.graph_module.named_buffers())
    assert all(graph.lowered.get_buffer(name) is tensor for name, tensor in buffers.items())
    tripled = fxstream.Diagonal({n: 3.0 * v for n, v in posterior.variances.items()})
    expected = fxstream.streamline(model, tripled, backend="eager")(inputs[0]).var
    with torch.no_grad():  # the buffers may be the posterior's own tensors: update after copying them above
        for tensor in buffers.values():
            tensor.mul_(3.0)
    after = streamlined(inputs[0]).var
    torch.testing.assert_close(after, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(after, before)


def _concurrent(streamlined, inputs: list[torch.Tensor], threads: int = 8, rounds: int = 3) -> list:
    """Each thread calls ``streamlined`` on its own input ``rounds`` times, all starting together."""
    results: list = [None] * threads
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = [streamlined(inputs[i]) for _ in range(rounds)]
        except BaseException as error:  # noqa: BLE001  (reported below, with the thread's index)
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    return results


def _thread_inputs(threads: int = 8) -> list[torch.Tensor]:
    return [torch.randn(2 + i % 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i in range(threads)]


def _assert_identical(results: list, references: list) -> None:
    for calls, reference in zip(results, references):
        for pred in calls:
            assert torch.equal(pred.mean, reference.mean) and torch.equal(pred.var, reference.var)


def test_one_eager_model_serves_eight_threads_with_single_threaded_results() -> None:
    """A GELU network (its rule differentiates by forward-mode AD, whose levels are thread-local)."""
    model, posterior, _, _ = _case("mlp")
    inputs = _thread_inputs()
    references = [fxstream.streamline(model, posterior, backend="eager")(x) for x in inputs]
    shared = fxstream.streamline(model, posterior, backend="eager")
    _assert_identical(_concurrent(shared, inputs), references)


def test_inductor_compiles_once_for_three_shapes_and_serves_eight_threads() -> None:
    model, posterior, inputs, _ = _case("mlp")
    eager = fxstream.streamline(model, posterior, backend="eager")
    compiled = fxstream.streamline(model, posterior, backend="inductor")
    for x in inputs:
        pred, reference = compiled(x), eager(x)
        torch.testing.assert_close(pred.mean, reference.mean, rtol=1e-12, atol=0)
        torch.testing.assert_close(pred.var, reference.var, rtol=1e-10, atol=0)
    assert len(compiled.graphs) == 1
    threaded = _thread_inputs()
    _assert_identical(_concurrent(compiled, threaded), [compiled(x) for x in threaded])
    assert len(compiled.graphs) == 1
