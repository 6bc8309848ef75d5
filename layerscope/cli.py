"""The ``layerscope`` command. Each subcommand lives in ``layerscope/commands/<name>.py`` and
exposes ``register(subparsers)``; errors become one line on stderr and exit status 2.

Only the module of the command that runs is imported (``layerscope info`` starts in a
fraction of the time importing every command's dependencies takes); the others are listed
by name and one-line help (``layerscope.commands.HELP``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence
from typing import NoReturn

from layerscope.commands import HELP
from layerscope.core import LayerscopeError

#: subcommand modules, in the order ``--help`` lists them
COMMANDS = tuple(HELP)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one line too (argparse would print the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(commands: Collection[str] = COMMANDS) -> argparse.ArgumentParser:
    """The parser; ``commands`` are registered in full (their modules imported), the others
    by name and help only (enough for ``layerscope --help`` and a mistyped command)."""
    parser = _Parser(
        prog="layerscope",
        description="Capture what happens inside a neural network into a Zarr trace, and draw it.",
    )
    from layerscope import __version__

    parser.add_argument("--version", action="version", version=f"layerscope {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        if name in commands:
            importlib.import_module(f"layerscope.commands.{name}").register(subparsers)
        else:
            subparsers.add_parser(name, help=HELP[name])
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first argument that is not an option (the top-level
    options, --help and --version, take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    parser = build_parser([command] if command in COMMANDS else [])
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
