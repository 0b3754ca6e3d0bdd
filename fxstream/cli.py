"""The ``fxstream`` command line.

Each command lives in its own module exposing ``register(subparsers)``, which
adds a sub-parser and sets its ``run`` default to a function ``run(args) ->
int``. To add a command, write such a module and list it in ``COMMANDS``.

Exit codes: 0 success, 1 error (one line on stderr; ``--debug`` shows the
traceback), 2 usage error (argparse).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import demo
from .planner import inspect_cli, plan_cli

COMMANDS = (demo, plan_cli, inspect_cli)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per module in ``COMMANDS``."""
    parser = argparse.ArgumentParser(
        prog="fxstream", description="Sampling-free predictive for Bayesian neural networks."
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(subparsers)
    for subparser in subparsers.choices.values():  # also accept "fxstream COMMAND --debug"
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("fxstream: interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # noqa: BLE001 - the CLI turns every failure into one line
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else ""
        print(f"fxstream: error: {type(error).__name__}: {message} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
