"""The ``fxstream`` command line.

Each command lives in its own module exposing ``register(subparsers)``, which
adds a sub-parser and sets its ``run`` default to a function ``run(args) ->
int``. To add a command, write such a module and list it in ``COMMANDS``.
Every command also gets ``--device`` (``args.device``: where the model and its
inputs run) and ``--debug``.

Exit codes: 0 success, 1 error (on stderr: fxstream's own errors in full,
others as one line; ``--debug`` shows the traceback), 2 usage error
(argparse), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Sequence

from . import __version__, demo
from .errors import FxstreamError, FxstreamWarning
from .planner import inspect_cli, plan_cli

COMMANDS = (demo, plan_cli, inspect_cli)


def _device(text: str) -> str:
    if re.fullmatch(r"cpu|cuda(:\d+)?", text) is None:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got '{text}'")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per module in ``COMMANDS``."""
    import torch

    parser = argparse.ArgumentParser(
        prog="fxstream", description="Sampling-free predictive for Bayesian neural networks."
    )
    parser.add_argument("--version", action="version", version=f"fxstream {__version__} (torch {torch.__version__})")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument("--device", type=_device, default="cpu",
                               help="where the model and its inputs run: cpu (default), cuda or cuda:N")
        # also accept "fxstream COMMAND --debug"
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FxstreamError(f"--device {device}: CUDA is not available to this torch ({torch.__version__}); "
                                "use --device cpu or a CUDA build of torch")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise FxstreamError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _show_warning(original):
    """Warnings as ``fxstream: warning: ...`` lines; other libraries' warnings as Python prints them."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FxstreamWarning):
            print(f"fxstream: warning: {message}", file=sys.stderr if file is None else file)
        else:
            original(message, category, filename, lineno, file, line)

    return show


def error_message(error: BaseException) -> str:
    """What the CLI prints for an error: fxstream's own errors whole (UnsupportedOpError lists every op on
    the lines after its first), anything else as its first line."""
    text = str(error)
    if not isinstance(error, FxstreamError):
        text = text.splitlines()[0] if text else ""
    hint = "(rerun with --debug for the traceback)"
    text = f"fxstream: error: {type(error).__name__}: {text}"
    return f"{text} {hint}" if "\n" not in text else f"{text}\n{hint}"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning(warnings.showwarning)
            _check_device(args.device)
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("fxstream: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns every failure into a message and exit code 1
        if args.debug:
            raise
        print(error_message(error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
