"""The rule table: one covariance rule per exact ATen overload.

A rule is a small pure function of a :class:`RuleCall` (the op, its mean
arguments, the covariances of the uncertain ones, the mean output) that returns
the output covariance. Rules register with :func:`register`; the pair pass looks
them up by ``node.target``. The rewritten graph calls each rule through a named
wrapper (``cov_<rule>``), so printed graphs say which rule made every node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._ops import OpOverload
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils._pytree import tree_leaves, tree_map_only

Path = tuple[tuple[str, Any], ...]

ACTIVATION_STRUCTURES = ("diag", "full")

# Rule options a user picks in ``fxstream.streamline(...)``; the first choice is the default.
RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    # "paper": queries and keys from the means, only value uncertainty propagated;
    # "linearised": query/key uncertainty through the softmax linearised at the mean too.
    "attention": ("paper", "linearised"),
    # "paper": normalisation statistics from the mean input, held constant;
    # "linearised": the full Jacobian of the norm at the mean, through its statistics.
    "norm": ("paper", "linearised"),
    # "paper": a residual add treats its skip path and branch as independent; "linearised": it
    # adds their covariance 2 v_h * diag(J_f), for branches whose Jacobian diagonal the forms in
    # fxstream.rules.residual carry (MLP branches, two-convolution branches, attention branches under
    # attention="paper").
    "residual": ("paper", "linearised"),
    # "exact": the variance GEMMs of linear layers in the model's dtype; "bfloat16": their
    # operands rounded to bfloat16 (tensor cores on a GPU), about 0.4% relative error in the
    # variances, for outputs such as a 50k-vocabulary head where that GEMM is as large as the mean's.
    "variance_matmul": ("exact", "bfloat16"),
    # "moments": a product of two uncertain factors (weight times input, activation times
    # activation) keeps its second-order term v_x v_z, the exact moments of that op (the paper);
    # "linearised": first order throughout, the linearised-Laplace (GLM) predictive, which the
    # pass reproduces exactly with activation_cov="full" and a layer-wise independent posterior.
    "products": ("moments", "linearised"),
    # "independent": an op whose inputs share an uncertain ancestor (a residual add, Q/K/V of one
    # input) treats them as independent (the paper); "exact": with activation_cov="full", every
    # activation carries its cross-covariance with the activations still to be read, and joins add it
    # (fxstream.rules.cross), so first-order rules give J Sigma J^T for any branching.
    "joins": ("independent", "exact"),
    # "independent": a product of two factors computed from one tensor (SwiGLU's silu(h W_g) * (h W_u))
    # treats them as independent (the paper); "linearised": for diagonal activations it adds their
    # covariance diag(J_a diag(v_h) J_b^T) (fxstream.rules.gates), where each factor is per-element ops
    # around at most one linear map from h.
    "gates": ("independent", "linearised"),
    # "full": an output's covariance has the activations' structure; "diag": with activation_cov="full",
    # outputs carry variances only. The last linear layer before an output (past views and slices)
    # computes them from its input's full covariance, diag(W C W^T) per row, so the output's own
    # covariance (a 50k-vocabulary head's: (tokens x vocabulary)^2 per sample) is never formed.
    "output_cov": ("full", "diag"),
    # "correlated": with diagonal activations, an interpolation (F.interpolate's linear, bilinear,
    # trilinear, bicubic modes) takes the positions it blends as perfectly correlated, var = (A sd)^2:
    # exact for smooth maps such as a segmentation head's logits, whose neighbouring positions share
    # weights; "independent": var = (A o A) v, the diagonal rule of any linear map (fxstream.rules.interpolate).
    "interpolation": ("correlated", "independent"),
}
DEFAULT_RULE_OPTIONS = {name: choices[0] for name, choices in RULE_OPTIONS.items()}


@dataclass
class RuleCall:
    """Everything a rule sees at run time.

    ``args``/``kwargs`` are the op's mean arguments as in the graph; ``covs`` and
    ``kinds`` have the same nesting, holding the covariance (or None) and its
    structure name ("diag", "full" for activations; "param_diag" for a
    diagonal weight posterior) of each uncertain tensor. ``structure`` is the
    activation structure the rule must return. ``options`` holds the rule
    options (see ``RULE_OPTIONS``), every key present.
    """

    op: OpOverload
    args: tuple
    kwargs: dict
    covs: tuple
    kw_covs: dict
    kinds: tuple
    kw_kinds: dict
    out: Any
    structure: str
    options: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_RULE_OPTIONS))
    batch: Any = None

    def arg(self, index: int, default: Any = None) -> Any:
        """Positional argument ``index`` (or the keyword / schema default for it)."""
        if index < len(self.args):
            return self.args[index]
        schema_arg = self.op._schema.arguments[index]
        if schema_arg.name in self.kwargs:
            return self.kwargs[schema_arg.name]
        if schema_arg.has_default_value():
            return schema_arg.default_value
        return default

    def cov(self, index: int) -> Any:
        """Covariance of positional argument ``index`` (None when it is deterministic)."""
        return self.covs[index] if index < len(self.covs) else None

    def kind(self, index: int) -> str | None:
        return self.kinds[index] if index < len(self.kinds) else None

    @property
    def second_order(self) -> bool:
        """Whether a product of two uncertain factors keeps its v_x v_z term (option ``products``)."""
        return self.options.get("products", "moments") == "moments"

    def uncertain(self) -> Iterator[tuple[Path, torch.Tensor, Any, str]]:
        """Yield (path, mean, cov, kind) for every uncertain tensor argument."""
        yield from _walk((("args", None),), self.args, self.covs, self.kinds)
        for key in self.kwargs:
            if key in self.kw_covs:
                yield from _walk(
                    (("kwargs", key),), self.kwargs[key], self.kw_covs[key], self.kw_kinds[key]
                )

    def tensors(self) -> Iterator[tuple[Path, torch.Tensor]]:
        """Yield (path, mean) for every tensor argument, uncertain or not."""
        yield from _tensor_leaves((("args", None),), self.args)
        for key, value in self.kwargs.items():
            yield from _tensor_leaves((("kwargs", key),), value)

    def substituted(self, replacements: dict[Path, Any]) -> tuple[tuple, dict]:
        """The mean args and kwargs with the tensors at the given paths replaced."""
        args, kwargs = list(self.args), dict(self.kwargs)
        for path, value in replacements.items():
            (root, key), rest = path[0], path[1:]
            if root == "args":
                (_, index), rest = rest[0], rest[1:]
                args[index] = _replace(args[index], rest, value)
            else:
                kwargs[key] = _replace(kwargs[key], rest, value)
        return tuple(args), kwargs

    def call_with(self, replacements: dict[Path, Any]) -> Any:
        """Run the op with the tensors at the given paths replaced, the rest at the means.

        Rules differentiate through this; an op registered with ``differentiable=`` runs as that
        written-out form (see :func:`register`).
        """
        args, kwargs = self.substituted(replacements)
        rule = RULES.get(self.op)
        written_out = rule.differentiable if rule is not None else None
        return (written_out or self.op)(*args, **kwargs)


def same_shape(first: torch.Size, second: torch.Size) -> bool:
    """Whether two shapes are provably equal, read without adding a guard on symbolic sizes (a plain
    comparison would specialise the capture wherever it cannot decide)."""
    return len(first) == len(second) and all(statically_known_true(a == b) for a, b in zip(first, second))


def arg_path(index: int) -> Path:
    """The path of positional argument ``index`` (for :meth:`RuleCall.call_with`)."""
    return (("args", None), ("item", index))


def _walk(prefix: Path, mean: Any, cov: Any, kind: Any) -> Iterator[tuple[Path, Any, Any, str]]:
    if isinstance(cov, (list, tuple)) and isinstance(mean, (list, tuple)):
        for i, (m, c, k) in enumerate(zip(mean, cov, kind)):
            yield from _walk(prefix + (("item", i),), m, c, k)
    elif cov is not None:
        yield prefix, mean, cov, kind


def _tensor_leaves(prefix: Path, value: Any) -> Iterator[tuple[Path, torch.Tensor]]:
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensor_leaves(prefix + (("item", i),), item)
    elif isinstance(value, torch.Tensor):
        yield prefix, value


def _replace(container: Any, rest: Path, value: Any) -> Any:
    if not rest:
        return value
    (_, index), rest = rest[0], rest[1:]
    items = list(container)
    items[index] = _replace(items[index], rest, value)
    return type(container)(items) if isinstance(container, tuple) else items


RuleFn = Callable[[RuleCall], Any]
#: A capability check: given the call as the pair pass sees it before anything runs (arguments
#: are example values such as fake tensors; ``covs`` holds the structure name of each uncertain
#: argument in place of its covariance), the reason the rule cannot handle it, or None.
Supports = Callable[[RuleCall], "str | None"]


@dataclass(frozen=True)
class Rule:
    """A registered rule: the op it covers, its function, and what it accepts."""

    op: OpOverload
    fn: RuleFn
    family: str
    structures: tuple[str, ...] = ACTIVATION_STRUCTURES
    param_kinds: tuple[str, ...] = ("param_diag",)
    param_passthrough: bool = False
    graph_target: Callable[..., Any] = field(compare=False, default=None)  # type: ignore[assignment]
    unread: Callable[[Mapping[str, str]], tuple[int, ...]] = field(compare=False, default=lambda options: ())
    supports: Supports | None = field(compare=False, default=None)
    differentiable: Callable[..., Any] | None = field(compare=False, default=None)

    @property
    def name(self) -> str:
        return self.fn.__name__


RULES: dict[OpOverload, Rule] = {}


#: The dtype the variance GEMMs of the running rule use (None: the operands' own), from the
#: "variance_matmul" option; set around each rule call, read by ``weights.matmul_into``.
VARIANCE_MATMUL_DTYPE: ContextVar[torch.dtype | None] = ContextVar("variance_matmul_dtype", default=None)
_VARIANCE_DTYPES = {"exact": None, "bfloat16": torch.bfloat16}


#: The dtype covariances of a model in this dtype are computed and kept in (see :func:`covariance_dtype`).
_COVARIANCE_DTYPES = {torch.float16: torch.float32}


def covariance_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype covariances of a model in ``dtype`` are computed in: float32 for float16 models, else ``dtype``.

    float16 holds no normal number below 6.1e-5, and variances are often far below that (a weight
    std of 1e-3 is a variance of 1e-6): in float16 they would be subnormal, with few significant
    bits, or zero. bfloat16 has float32's range and keeps its own dtype.
    """
    return _COVARIANCE_DTYPES.get(dtype, dtype)


def _holds(dtype: torch.dtype, tree: Any) -> bool:
    return any(isinstance(leaf, torch.Tensor) and leaf.dtype == dtype for leaf in tree_leaves(tree))


def _widened(tree: Any) -> Any:
    """float16 tensors of a rule's mean arguments in the dtype of its covariances (:func:`covariance_dtype`)."""
    return tree_map_only(torch.Tensor, lambda t: t.to(covariance_dtype(t.dtype)) if t.dtype == torch.float16 else t,
                         tree)


def _graph_target(fn: RuleFn, op: OpOverload) -> Callable[..., Any]:
    """The function the rewritten graph calls: builds the RuleCall and runs the rule."""

    def target(args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options=None, batch=None):
        options = DEFAULT_RULE_OPTIONS if options is None else options
        # A float16 model's covariances are float32 (covariance_dtype): its means join them in float32, and a
        # rule that routes a covariance through the model's own cast to float16 hands it back in float32.
        wide = _holds(torch.float32, (covs, kw_covs)) and _holds(torch.float16, (args, kwargs, out))
        if wide:
            args, kwargs, out = _widened((args, kwargs, out))
        token = VARIANCE_MATMUL_DTYPE.set(_VARIANCE_DTYPES[options.get("variance_matmul", "exact")])
        try:
            result = fn(RuleCall(op, args, kwargs, covs, kw_covs, kinds, kw_kinds, out, structure, options, batch))
            return _widened(result) if wide else result
        finally:
            VARIANCE_MATMUL_DTYPE.reset(token)

    target.__name__ = target.__qualname__ = f"cov_{fn.__name__}"
    target.__module__ = fn.__module__
    return target


def register(
    *ops: OpOverload,
    structures: tuple[str, ...] = ACTIVATION_STRUCTURES,
    param_kinds: tuple[str, ...] = ("param_diag",),
    param_passthrough: bool = False,
    unread: Callable[[Mapping[str, str]], tuple[int, ...]] = lambda options: (),
    supports: Supports | None = None,
    differentiable: Callable[..., Any] | None = None,
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the covariance rule of each overload in ``ops``.

    ``structures``: activation structures the rule can return. ``param_kinds``:
    parameter posteriors it accepts. ``param_passthrough``: the op keeps the
    entries of a parameter independent (elementwise maps, reshapes, slices), so
    it may transform an uncertain parameter before the parameter meets data.
    ``unread(options)``: the positional arguments whose covariance the rule
    ignores under those rule options; the pair pass does not hand them over, so
    pruning drops the covariance upstream that only they would have read.
    ``supports(call)``: the capability check (see :data:`Supports`); the pair pass runs it
    on every call of the op that needs a covariance, so a configuration the rule does not
    handle becomes an ``UnsupportedOpError`` naming the module, never an error from inside
    the rule. ``differentiable``: the op written out, for a kernel whose forward-mode derivative
    is missing or fails when traced for lowering; every Jacobian taken through the op with
    :meth:`RuleCall.call_with` (pointwise linearisation, cross-covariances) uses it.
    """

    def decorate(fn: RuleFn) -> RuleFn:
        family = fn.__module__.rsplit(".", 1)[-1]
        for op in ops:
            if op in RULES:
                raise RuntimeError(f"two rules registered for {op}: {RULES[op].name} and {fn.__name__}")
            RULES[op] = Rule(op, fn, family, structures, param_kinds, param_passthrough, _graph_target(fn, op),
                             unread, supports, differentiable)
        return fn

    return decorate
