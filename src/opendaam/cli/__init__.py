"""The ``opendaam`` command: one module per subcommand, each with ``add_parser`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

SUBCOMMANDS = ["demo", "generate", "optimize", "nearest", "evaluate", "experiment", "dataset", "toyworld"]
"""Subcommand modules of :mod:`opendaam.cli`, in the order ``--help`` lists them."""


def main(argv: list[str] | None = None) -> int:
    """Run the ``opendaam`` command line.

    Example:
        >>> main(["--version"])  # doctest: +SKIP
    """
    from opendaam import __version__

    parser = argparse.ArgumentParser(
        prog="opendaam", description="Word-to-pixel attribution maps from the cross-attention of diffusion models: "
        "DAAM, open-vocabulary and linear DAAM, token optimization, evaluation and synthetic datasets.",
        epilog="Run 'opendaam <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"opendaam {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"opendaam.cli.{name}")
        module.add_parser(sub)
    for command in sub.choices.values():  # module docstrings use reST literals; --help shows plain text
        command.description = (command.description or "").replace("``", "")
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"opendaam {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
