"""The ``layerscope`` command. Each subcommand lives in ``layerscope/commands/<name>.py`` and
exposes ``register(subparsers)``; errors become one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from layerscope.core import LayerscopeError

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = ("trace", "estimate", "info", "verify", "render", "report", "diff")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse would print the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="layerscope",
        description="Capture what happens inside a neural network into a Zarr trace, and draw it.",
    )
    from layerscope import __version__

    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"layerscope.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"layerscope.commands.{name}":
                continue  # a command not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except LayerscopeError as exc:
        print(f"layerscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"layerscope {args.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as exc:
        print(f"layerscope {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
