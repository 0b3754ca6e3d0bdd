"""``fxstream.streamline``: a model plus a posterior in, a one-pass predictive out."""

from __future__ import annotations

import itertools
import threading
import types
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch._dynamo
import torch.fx.experimental._config
from torch.utils._pytree import tree_leaves

from .backend import StreamlineOptions, Streamlined, compile_streamlined, predictive
from .errors import FxstreamError, FxstreamWarning, GraphBreakError, PosteriorMismatchError
from .posterior import Entries, ParameterCovariance, Posterior
from .passes.capture import CAPTURING
from .pipeline import placed, warn_lost
from .predictive import Predictive
from .rules.registry import covariance_dtype

# Made once and re-entered by every call: each config patch object owns a context variable, so one made
# per call grew the thread's context by one entry a call (about 300 bytes a call, never freed).
_NUMBERS_CONSTANT = torch._dynamo.config.patch(specialize_int=True, specialize_float=True)
_NO_DUCK_SIZING = torch.fx.experimental._config.patch(use_duck_shape=False)


def _batch_symbolic(args: tuple, kwargs: dict) -> None:
    """Ask Dynamo for a symbolic first dim (the batch) on every tensor input, so that a DataLoader's last
    partial batch reuses the graph (a size of 0 or 1 is still specialised)."""
    for value in tree_leaves((args, kwargs)):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, 0)


class StreamlinedModel(torch.nn.Module):
    """A model whose call returns the :class:`Predictive` of its output.

    The first call captures the model with Dynamo (one graph, no breaks),
    rewrites it, lowers it to ATen and compiles it; later calls reuse it for
    every size Dynamo's guards admit. The batch (every input's first dim) is
    symbolic from the first call; any other input size is fixed until a call
    changes it, which compiles one more graph with that size symbolic too
    (torch.compile's automatic dynamic shapes). So a language model whose
    batch and sequence length vary compiles 2 graphs, an image model at one
    image size 1. Another input dtype, device or number of dims, or a size of
    0 or 1 (Dynamo specialises those) compiles another; ``MAX_GRAPHS`` is the
    limit (see docs/index.md).
    ``graphs`` holds every compiled graph for inspection. One instance serves
    concurrent calls from many threads.
    ``posterior`` is the posterior it predicts with; the graphs read a copy of
    its tensors (in the parameters' dtype and device) that :meth:`set_posterior`
    overwrites in place.
    """

    #: Dynamo's recompile limit for one StreamlinedModel; beyond it a call raises rather than compile again.
    MAX_GRAPHS = 64

    def __init__(self, model: torch.nn.Module, options: StreamlineOptions, output: str | int | None) -> None:
        super().__init__()
        self.model = model
        self.posterior = options.posterior
        if options.posterior is not None:
            options.posterior = _owned(options.posterior, model)
        self.options = options
        self.output = output
        self.graphs: list[Streamlined] = []
        options.on_compile = self.graphs.append
        options.model = model

        def backend(gm, example_inputs):
            return compile_streamlined(gm, example_inputs, options)

        select = self._select

        def selected_output(*args: Any, **kwargs: Any) -> torch.Tensor:
            """The model's call reduced to the one output we predict, so other outputs
            (hidden states, key/value caches) get no covariance work at all."""
            return select(model(*args, **kwargs))

        # Dynamo keeps its cache and its recompile limit per code object, so each StreamlinedModel gets a
        # code object of its own (else every instance in a process would share one limit: a test suite
        # or a tuning loop would run out of it). Sizes other than the batch's are symbolic only once they
        # vary (dynamic=None): symbolic image sizes make a CNN's graph several times slower to lower (its
        # shape arithmetic goes through sympy), for sizes that seldom change.
        self._compiled = torch.compile(_own_code(selected_output), backend=backend, fullgraph=True, dynamic=None,
                                       recompile_limit=self.MAX_GRAPHS)
        self._hooks_aside = _BackwardHooksAside(model)

    def forward(self, *args: Any, **kwargs: Any) -> Predictive:
        # Symbolic tensor sizes only (Dynamo's config values are per thread): Python numbers such as a
        # dropout probability stay constants, and without duck sizing two sizes that happen to be equal in
        # the first call (batch 8, sequence 8) get their own symbols, so neither is fixed by the other's guard.
        with torch.no_grad(), _NUMBERS_CONSTANT, _NO_DUCK_SIZING, CAPTURING:
            try:
                _batch_symbolic(args, kwargs)
                with self._hooks_aside():
                    out = self._compiled(*args, **kwargs)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                raise FxstreamError(
                    f"this StreamlinedModel has compiled {len(self.graphs)} graphs, its limit of {self.MAX_GRAPHS}: "
                    "calls keep changing what Dynamo's guards fix (input dtypes, devices, numbers of dims). "
                    "Call it with inputs of one dtype and device, or make one StreamlinedModel per kind of input"
                ) from None
            except torch._dynamo.exc.BackendCompilerFailed as error:
                inner = getattr(error, "inner_exception", None)
                if isinstance(inner, FxstreamError):
                    raise inner.with_traceback(None) from None
                raise
            except torch._dynamo.exc.Unsupported as error:
                reason = str(error).splitlines()[0].rstrip(".")
                raise GraphBreakError(
                    "the model cannot be captured as a single graph, and covariance cannot cross a graph "
                    f"break. Dynamo stops at: {reason}. {_remedy(reason)}"
                ) from None
        return predictive(out)

    def _select(self, out: Any) -> torch.Tensor:
        return select_output(out, self.output)

    def set_posterior(self, posterior: Posterior) -> None:
        """Predict with ``posterior`` from now on, without a new capture or compile.

        Its tensors are copied into the buffers every compiled graph reads, so it must have the
        structure of the current one: the same parameters, each with the same covariance kind and
        tensor shapes (``with_prior_precision`` and ``scaled`` keep them). Anything else raises
        :class:`PosteriorMismatchError` naming the parameter; streamline again for a new structure.
        """
        live = self.options.posterior
        if live is None:
            raise FxstreamError("this model was streamlined without a weight posterior, so it has none to replace; "
                                "call fxstream.streamline(model, posterior) instead")
        if not isinstance(posterior, Posterior):
            raise PosteriorMismatchError(f"set_posterior takes an fxstream posterior such as fxstream.Diagonal, got "
                                         f"{type(posterior).__name__}")
        names, given = live.parameter_names(), posterior.parameter_names()
        for name in given:
            if name not in names:
                raise PosteriorMismatchError(
                    f"the new posterior covers parameter '{name}', which the streamlined posterior leaves "
                    "deterministic; streamline again to change which parameters are uncertain"
                )
        for name in names:
            if name not in given:
                raise PosteriorMismatchError(
                    f"the new posterior leaves parameter '{name}' out, which the streamlined posterior covers; "
                    "give it a zero covariance (posterior.scaled({...: 0})) or streamline again"
                )
        posterior.validate(dict(self.model.named_parameters()))
        copies = []
        for name in names:
            old, new = live.covariance(name), posterior.covariance(name)
            old_shapes, new_shapes = [tuple(t.shape) for t in old.tensors], [tuple(t.shape) for t in new.tensors]
            if old.kind != new.kind or old_shapes != new_shapes:
                raise PosteriorMismatchError(
                    f"parameter '{name}' has covariance '{new.kind}' with tensor shapes {new_shapes} in the new "
                    f"posterior, but the model was streamlined for '{old.kind}' with {old_shapes}; set_posterior "
                    "keeps the structure (with_prior_precision and scaled do): streamline again for another"
                )
            copies.extend(zip(old.tensors, new.tensors))
        with torch.no_grad():
            for buffer, tensor in copies:
                buffer.copy_(tensor)
        self.posterior = posterior


_INSTANCES = itertools.count()


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own (same body, closure and globals)."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_INSTANCES)}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


def select_output(out: Any, output: str | int | None = None) -> torch.Tensor:
    """The tensor a streamlined model predicts from the model's output: ``output`` picks it by key or
    index; else a tensor itself, the "logits" of a dict-like output, or its first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if output is not None:
        return out[output]
    if isinstance(out, dict) or hasattr(out, "keys"):
        if "logits" in out:
            return out["logits"]
        return next(v for v in out.values() if isinstance(v, torch.Tensor))
    if isinstance(out, (list, tuple)):
        return next(v for v in out if isinstance(v, torch.Tensor))
    raise FxstreamError(f"cannot find a tensor in the model's output of type {type(out).__name__}")


def _owned(posterior: Posterior, model: torch.nn.Module) -> Posterior:
    """The posterior's covariances as tensors of its own, on each parameter's device and in the dtype its
    covariances are computed in (:func:`fxstream.pipeline.placed`, which checks the cast): the buffers every
    graph reads, which set_posterior overwrites without touching the caller's posterior. A tensor two
    parameters share (a layer's joint weight-bias block) stays shared."""
    params = dict(model.named_parameters())
    copies: dict[int, torch.Tensor] = {}
    lost: dict[str, int] = {}
    entries = {}
    for name in posterior.parameter_names():
        cov = posterior.covariance(name)
        for t in cov.tensors:
            if id(t) not in copies:
                (cast,) = placed(name, (t,), params[name], lost)
                copies[id(t)] = cast.clone() if cast is t else cast
        entries[name] = ParameterCovariance(cov.kind, tuple(copies[id(t)] for t in cov.tensors), cov.shape)
    warn_lost(lost, {covariance_dtype(params[name].dtype) for name in lost})
    return Entries(entries)


class _BackwardHooksAside:
    """Module backward hooks (e.g. BackPack's, left by laplace-torch's fit) set aside while calls run.

    Prediction runs no backward pass, so they would never fire; Dynamo cannot
    capture a module that has them ("Module-level backwards hooks require
    compiled autograd"), and its guards check them on every call. With calls
    from several threads the hooks go aside when the first call starts and come
    back when the last one ends, so no call sees them return mid-flight.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.running = 0
        self.saved: list[tuple[torch.nn.Module, OrderedDict, OrderedDict]] = []

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self.lock:
            if self.running == 0:
                self.saved = self._take()
            self.running += 1
        try:
            yield
        finally:
            with self.lock:
                self.running -= 1
                if self.running == 0:
                    for module, hooks, pre_hooks in self.saved:
                        module._backward_hooks, module._backward_pre_hooks = hooks, pre_hooks
                    self.saved = []

    def _take(self) -> list[tuple[torch.nn.Module, OrderedDict, OrderedDict]]:
        saved = []
        for module in self.model.modules():
            if module._backward_hooks or module._backward_pre_hooks:
                saved.append((module, module._backward_hooks, module._backward_pre_hooks))
                module._backward_hooks, module._backward_pre_hooks = OrderedDict(), OrderedDict()
        return saved


def _remedy(reason: str) -> str:
    """What to do about the graph break Dynamo names."""
    lowered = reason.lower()
    if "hook" in lowered:
        return ("The model has module or tensor hooks that Dynamo cannot trace: remove them (the handles "
                "returned when they were registered) before streamlining.")
    if "data-dependent" in lowered or "data dependent" in lowered or "jump" in lowered or "branch" in lowered:
        return ("Rewrite the data-dependent Python control flow in the model's forward (e.g. torch.where "
                "instead of an `if` on a tensor's value).")
    return "Change the call it names in the model's forward, or leave it out of the part you streamline."


def streamline(
    model: torch.nn.Module,
    posterior: Posterior | None = None,
    *,
    likelihood: Literal["classification", "regression"] | None = None,
    sigma_noise: float | None = None,
    input_var: torch.Tensor | float | None = None,
    input_cov: torch.Tensor | None = None,
    activation_cov: Literal["diag", "full"] = "diag",
    attention: Literal["paper", "linearised"] = "paper",
    norm: Literal["paper", "linearised"] = "paper",
    residual: Literal["paper", "linearised"] = "paper",
    variance_matmul: Literal["exact", "bfloat16"] = "exact",
    products: Literal["moments", "linearised"] = "moments",
    joins: Literal["independent", "exact"] = "independent",
    gates: Literal["independent", "linearised"] = "independent",
    output_cov: Literal["full", "diag"] = "full",
    interpolation: Literal["correlated", "independent"] = "correlated",
    backend: Literal["inductor", "eager"] = "inductor",
    output: str | int | None = None,
    budget: int | str | None = None,
    example_inputs: tuple | torch.Tensor | None = None,
    sizes: dict[str, int] | None = None,
) -> StreamlinedModel:
    """Turn ``model`` and a weight posterior into a module that predicts mean and covariance in one pass.

    Args:
        model: any ``nn.Module`` that Dynamo captures as one graph; put it in eval mode.
        posterior: e.g. ``fxstream.Diagonal({name: variance})``; None leaves all weights deterministic.
        likelihood: "classification", "regression" or None (raw outputs).
        sigma_noise: observation noise std for regression.
        input_var: Gaussian input variance, broadcastable to the (first floating) input.
        input_cov: per-sample input covariance (N, N) over the input's N non-batch elements.
        activation_cov: "diag" (one variance per activation) or "full" (a covariance over
            all non-batch elements of each sample).
        attention: "paper" takes attention probabilities from the mean queries and keys and
            propagates only value uncertainty; "linearised" also propagates query/key uncertainty
            through the softmax linearised at the mean.
        norm: "paper" holds layer/RMS norm statistics at their values for the mean input;
            "linearised" uses the norm's full Jacobian at the mean, through its statistics.
        residual: "paper" treats the two operands of a residual add as independent;
            "linearised" adds their covariance 2 v_h * diag(J_f) (first order) wherever the
            branch f is elementwise ops around at most two linear maps or two stride-1
            convolutions (MLP and gated-MLP branches, ResNet basic blocks) or an attention
            branch under attention="paper" (its value path), and warns once with how many
            joins it left independent and why (bottlenecks, downsampling shortcuts). Trained branches partly cancel what they receive, which
            "paper" misses: see docs/transformers.md.
        variance_matmul: "exact" runs the variance GEMMs of linear layers in the model's dtype;
            "bfloat16" rounds their operands to bfloat16 (tensor cores on a GPU; about 0.4%
            relative error in the variances). Worth it where such a GEMM is as large as the
            mean's, e.g. a 50k-vocabulary head; means are untouched.
        products: "moments" keeps the second-order term v_x v_z of every product of two
            uncertain factors (weight times input, activation times activation): the exact
            moments of each such op, as in the paper. "linearised" drops it: first order
            throughout, the linearised-Laplace (GLM) predictive, which the pass then equals
            exactly with activation_cov="full" (weights independent across layers) on networks
            without branches.
        joins: "independent" treats the inputs of an op that share an uncertain ancestor (a
            residual add, attention's Q/K/V, a gate times its up projection, a DenseNet concat)
            as independent, as the paper does. "exact" (needs activation_cov="full") carries
            every activation's cross-covariance with the activations still to be read and adds
            it where they meet: with the "linearised" options the predictive is then J Sigma J^T
            for any architecture. A parameter read by more than one op (tied embeddings, ALBERT's
            shared layers) is a fork too, its covariance formed dense (N^2 for N entries): meant for
            small tied parameters; a tie it cannot carry is named in a warning.
            Costs a cross-covariance per pair of live activations (a residual stream and the
            block's current tensor: about 2-4x the full pass).
        gates: "independent" treats the two factors of a product computed from one tensor (SwiGLU's
            silu(h W_g^T) * (h W_u^T), GEGLU) as independent, as the paper does. "linearised" adds their
            covariance (first order, diagonal activations) where each factor is elementwise ops around at
            most one linear map from the common tensor; one GEMM of the gate's size per gate
            (``fxstream.rules.gates``).
        output_cov: with activation_cov="full", "full" returns each output's covariance (``.cov``) and
            "diag" its variances only: the last linear layer before the output computes them from its
            input's full covariance (each row's diag(W C W^T)), so the output's own covariance, which
            for a language model's head is (tokens x vocabulary)^2 per sample, is never formed.
        interpolation: how diagonal activations pass an interpolation (``F.interpolate`` in linear,
            bilinear, trilinear or bicubic mode, e.g. a segmentation head's upsampling). "correlated"
            takes the positions each output blends as perfectly correlated (the standard deviations
            are interpolated), exact for smooth feature maps; "independent" treats them as
            independent, var = (A o A) v, which dips between source positions in a grid pattern.
            Full activations carry the interpolation exactly either way (``fxstream.rules.interpolate``).
        backend: "inductor" compiles the rewritten graph; "eager" runs it as an FX GraphModule.
        output: the key or index of the output to return the predictive of, for models returning
            a dict, dataclass or tuple (default: "logits" if present, else the first tensor).
        budget: a memory budget (bytes or e.g. "2GiB"): :func:`fxstream.planner.plan` then picks
            which layers of ``posterior`` stay Bayesian and the activation structure; needs
            ``example_inputs`` (also the calibration batch) and optionally ``sizes`` to plan for
            (e.g. ``{"batch": 32}``). The plan is kept as ``.plan`` on the returned model.
    """
    if model.training:
        raise FxstreamError("the model is in training mode; call model.eval() before streamline()")
    rule_options = {"attention": attention, "norm": norm, "residual": residual,
                    "variance_matmul": variance_matmul, "products": products,
                    "joins": joins, "gates": gates, "output_cov": output_cov, "interpolation": interpolation}
    chosen = None
    if budget is not None:
        from .planner import plan

        if example_inputs is None or posterior is None:
            raise FxstreamError("budget= needs a posterior and example_inputs= (a typical call's inputs)")
        chosen = plan(model, example_inputs, posterior, budget, sizes=sizes, rule_options=rule_options,
                      output=output)
        if activation_cov != "diag" and chosen.activation_cov != activation_cov:
            warnings.warn(f"with budget= the plan chooses the activation covariance: it chose "
                          f"'{chosen.activation_cov}', so activation_cov='{activation_cov}' has no effect",
                          FxstreamWarning, stacklevel=2)
        posterior, activation_cov = chosen.posterior, chosen.activation_cov
    elif example_inputs is not None or sizes is not None:
        given = " and ".join(n for n, v in (("example_inputs=", example_inputs), ("sizes=", sizes)) if v is not None)
        warnings.warn(f"{given} only serve the memory planner and have no effect without budget=",
                      FxstreamWarning, stacklevel=2)
    if posterior is not None and isinstance(posterior, Posterior):
        posterior.validate(dict(model.named_parameters()))
    options = StreamlineOptions(
        posterior=posterior,
        likelihood=likelihood,
        sigma_noise=sigma_noise,
        input_var=input_var,
        input_cov=input_cov,
        activation_cov=activation_cov,
        rule_options=rule_options,
        backend=backend,
    )
    options.check()
    streamlined = StreamlinedModel(model, options, output)
    streamlined.plan = chosen
    return streamlined
