"""The ``opendaam`` command: one module per subcommand, each with ``add_parser`` and ``run``.

Exit codes (every command):

* ``0``: done.
* ``1``: it could not run here: an optional package is missing (the message names the extra to install,
  e.g. ``pip install 'opendaam[eval]'``), another process holds the output folder's lock, a file cannot
  be written (permissions, full disk), or the work failed at run time.
* ``2``: bad input: a usage error (unknown option, missing argument), an option out of range, a missing
  or malformed file, model, spec, record or token. Checked before any model loads; nothing is written.
* ``130``: interrupted (Ctrl-C); rerun the same command to continue where it can.

Errors are one line on stderr, ``opendaam <command>: error: ...``, without a Python traceback.

Verbosity (every command, before or after the command name): by default the progress bars and warnings
of diffusers, transformers, datasets and huggingface_hub are silenced (opendaam's own progress bars stay); ``-v``
shows them, ``-q`` also hides opendaam's progress bars.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main", "set_verbosity"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

SUBCOMMANDS = ["demo", "generate", "optimize", "nearest", "evaluate", "experiment", "dataset", "toyworld", "report"]
"""Subcommand modules of :mod:`opendaam.cli`, in the order ``--help`` lists them."""

_CLI_TERMS = (
    ("pass pipe= to encode it", "add --model (the pipeline the records were made with) to encode it"),
    ("pass pipe=...", "add --model"),
    ("pass pipe=", "add --model"),
    ("method='open_vocab' or method='linear'", "--method open_vocab or --method linear"),
)
"""Library phrases and the command-line words for them."""

_MODULE_EXTRA = {"matplotlib": "eval", "yaml": "dataset", "pycocotools": "dataset", "scipy": "dataset",
                 "accelerate": "dataset",
                 "datasets": "huggingface"}


def _leaf_parsers(parser: argparse.ArgumentParser):
    """Every parser that runs a command (the leaves of the subcommand tree)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaf_parsers(child)


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    """``-v/--verbose`` and ``-q/--quiet`` (as a pair that excludes itself)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_const", const=1, dest="verbosity", default=default,
                       help="show the progress bars and warnings of diffusers, transformers and the hub")
    group.add_argument("-q", "--quiet", action="store_const", const=-1, dest="verbosity", default=default,
                       help="only errors: also hide opendaam's progress bars")


def set_verbosity(level: int) -> None:
    """Silence (level 0, -1) or show (1) the loading bars and warnings of diffusers, transformers and the hub.

    Environment variables are set as well as the loggers, so that libraries imported later follow them.

    Examples:
        >>> set_verbosity(0); os.environ["HF_HUB_DISABLE_PROGRESS_BARS"]
        '1'
    """
    quiet = level <= 0
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1" if quiet else "0"
    os.environ["TRANSFORMERS_VERBOSITY"] = "error" if quiet else "warning"
    os.environ["DIFFUSERS_VERBOSITY"] = "error" if quiet else "warning"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1" if quiet else "0"
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1" if quiet else "0"  # read when datasets is imported
    os.environ["DATASETS_VERBOSITY"] = "error" if quiet else "warning"
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for module in (dlog, tlog):
        if quiet:
            module.set_verbosity_error()
            module.disable_progress_bar()
        else:
            module.set_verbosity_warning()
            module.enable_progress_bar()


def _message(error: BaseException) -> str:
    """The error's text in command-line terms."""
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    if isinstance(error, OSError) and error.filename and not isinstance(error, FileNotFoundError) and \
            str(error.filename) not in text:
        text = f"{error.strerror or text}: {error.filename}"
    for python, cli in _CLI_TERMS:
        text = text.replace(python, cli)
    return text.splitlines()[0] if text else type(error).__name__


def _exit_code(error: BaseException) -> int:
    """1 for errors of the run (missing packages, locks, writes), 2 for bad input."""
    from opendaam._io import LockError
    from opendaam.cli._checks import MissingExtra
    from opendaam.dataset.io import WriteError

    if isinstance(error, (MissingExtra, LockError, WriteError, ImportError, RuntimeError, MemoryError)):
        return EXIT_FAILED
    if isinstance(error, FileNotFoundError | NotADirectoryError | IsADirectoryError):
        return EXIT_USAGE
    if isinstance(error, OSError):
        return EXIT_FAILED
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    """Run the ``opendaam`` command line; returns the exit code (see the module docstring).

    Examples:
        >>> main(["--version"])  # doctest: +SKIP
    """
    from opendaam import __version__

    parser = argparse.ArgumentParser(
        prog="opendaam", description="Word-to-pixel attribution maps from the cross-attention of diffusion models: "
        "DAAM, open-vocabulary and linear DAAM, token optimization, evaluation and synthetic datasets.",
        epilog="Exit codes: 0 done, 1 could not run here (missing extra, locked folder, write error), "
        "2 bad input, 130 interrupted. Run 'opendaam <command> --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"opendaam {__version__}")
    _add_verbosity(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"opendaam.cli.{name}")
        module.add_parser(sub)
    for command in sub.choices.values():  # module docstrings use reST literals; --help shows plain text
        command.description = (command.description or "").replace("``", "")
        for leaf in _leaf_parsers(command):
            _add_verbosity(leaf, argparse.SUPPRESS)  # SUPPRESS: a flag before the command name is kept
    args = parser.parse_args(argv)
    args.verbosity = getattr(args, "verbosity", 0)
    set_verbosity(args.verbosity)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(f"opendaam {args.command}: interrupted; rerun the same command to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as error:
        extra = _MODULE_EXTRA.get((error.name or "").split(".")[0])
        hint = f"pip install 'opendaam[{extra}]'" if extra else f"pip install {error.name}"
        print(f"opendaam {args.command}: error: the package {error.name} is not installed: {hint}", file=sys.stderr)
        return EXIT_FAILED
    except (ValueError, KeyError, OSError, RuntimeError, MemoryError) as error:
        print(f"opendaam {args.command}: error: {_message(error)}", file=sys.stderr)
        return _exit_code(error)
    except Exception as error:
        if not type(error).__module__.startswith("safetensors"):
            raise  # a bug: its traceback is what a report needs
        print(f"opendaam {args.command}: error: a file is not a valid safetensors file ({_message(error)})",
              file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
