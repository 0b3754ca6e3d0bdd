"""``fxstream plan TARGET --budget 2GiB --batch 32``: what fits the budget, layer by layer."""

from __future__ import annotations

import argparse
import pickle
import warnings

import torch

from ..errors import FxstreamError, FxstreamWarning
from ..posterior import Diagonal, Posterior, is_posterior_file
from ..posterior import load_posterior as load_posterior_file
from ..rules import RULE_OPTIONS
from .plan import Planner, choose, parse_bytes
from .targets import Target, available, load


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plan`` sub-command."""
    parser = subparsers.add_parser(
        "plan", help="choose per-layer covariance structures that fit a memory budget",
        description="Plan the predictive of TARGET within a memory budget: per layer the structure, its bytes "
                    "and FLOPs (with formulas in batch/seq), totals, and the largest batch/seq the budget allows.")
    add_target_arguments(parser)
    parser.add_argument("--budget", required=True, type=_budget, help="memory budget: bytes or e.g. 2GiB, 512MB")
    parser.add_argument("--batch", type=_positive, help="batch size to plan for (default: the example's)")
    parser.add_argument("--seq", type=_positive, help="sequence length to plan for (token models)")
    parser.add_argument("--activation-cov", choices=("auto", "diag", "full"), default="auto",
                        help="activation covariance structures to consider (default auto: diag and full)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    parser.set_defaults(run=run)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """TARGET, --posterior, --variance and the rule options, shared by plan and inspect."""
    parser.add_argument("target", metavar="TARGET",
                        help=f"a built-in model ({', '.join(available())}) or module:callable returning "
                             "(model, example_input)")
    parser.add_argument("--posterior", metavar="FILE",
                        help="a posterior file written by posterior.save(FILE) (any structure), or a torch.save'd "
                             "dict of parameter name -> variance tensor (diagonal); default: every parameter "
                             "with variance --variance")
    parser.add_argument("--variance", type=float, default=None,
                        help=f"variance of every parameter when no --posterior is given (default {DEFAULT_VARIANCE})")
    for name, choices in RULE_OPTIONS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", choices=choices, default=choices[0],
                            help=f"fxstream.streamline's {name}= (default {choices[0]})")


DEFAULT_VARIANCE = 1e-3


def rule_options(args: argparse.Namespace) -> dict[str, str]:
    """The rule options given on the command line."""
    return {name: getattr(args, name) for name in RULE_OPTIONS}


def _budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except FxstreamError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def load_posterior(target: Target, path: str | None, variance: float | None) -> Posterior:
    """The posterior in FILE (a posterior file, or a dict of variances), or ``variance`` on every parameter.

    Checked against the target's parameters: a name or shape that does not fit names the parameter.
    """
    parameters = dict(target.model.named_parameters())
    if path is None:
        variance = DEFAULT_VARIANCE if variance is None else variance
        return Diagonal({n: torch.full_like(p, variance) for n, p in parameters.items()})
    if variance is not None:
        warnings.warn("--variance has no effect with --posterior", FxstreamWarning, stacklevel=2)
    device = next(iter(parameters.values())).device if parameters else torch.device("cpu")
    if is_posterior_file(path):
        posterior = load_posterior_file(path, device=device)
    else:
        try:
            variances = torch.load(path, map_location=device, weights_only=True)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as error:
            raise FxstreamError(f"cannot read the posterior file '{path}': {str(error).splitlines()[0]}; give a "
                                "file written by posterior.save(path) or a torch.save'd dict of parameter name -> "
                                "variance tensor") from None
        if not isinstance(variances, dict):
            raise FxstreamError(f"the posterior file '{path}' holds a {type(variances).__name__}; give a file written "
                                "by posterior.save(path) or a torch.save'd dict of parameter name -> variance tensor")
        posterior = Diagonal(variances)
    posterior.validate(parameters)
    return posterior


def target_on_device(spec: str, device: str) -> Target:
    """The target ``spec`` with its model and example inputs on ``device``."""
    target = load(spec)
    target.model.to(device)
    target.args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in target.args)
    return target


def run(args: argparse.Namespace) -> int:
    target = target_on_device(args.target, args.device)
    sizes = {}
    if args.batch is not None:
        sizes["batch"] = args.batch
    if args.seq is not None:
        if not any(name == "seq" for name in target.dims.values()):
            raise FxstreamError(f"target '{args.target}' has no sequence dimension; drop --seq")
        sizes["seq"] = args.seq
    posterior = load_posterior(target, args.posterior, args.variance)
    structures = ("diag", "full") if args.activation_cov == "auto" else (args.activation_cov,)
    planner = Planner(target.model, target.args, posterior, target.dims, progress=True, structures=structures,
                      rule_options=rule_options(args))
    chosen = choose(planner, args.budget, sizes)
    print(chosen.to_json() if args.format == "json" else chosen.table())
    return 0
