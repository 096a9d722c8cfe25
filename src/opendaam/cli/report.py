"""``opendaam report DIR``: a self-contained ``index.html`` for an output folder of ``generate``, ``demo``,
``experiment thesis``, ``evaluate`` or ``dataset generate`` (every picture embedded, no network needed)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    """Register the ``report`` subcommand."""
    p = sub.add_parser("report", help="write a self-contained HTML page for an output folder", description=__doc__)
    p.add_argument("folder", help="an output folder of generate, demo, experiment, evaluate or dataset generate")
    p.add_argument("--out", default=None, help="the HTML file (default: FOLDER/index.html)")
    p.add_argument("--title", default=None, help="page title (default: the folder's name)")
    p.add_argument("--limit", type=int, default=24, help="at most this many dataset items shown, >= 1")
    p.set_defaults(run=run)


def run(args) -> int:
    """Check the folder, write the page, print where it is."""
    from opendaam.cli._checks import in_range

    in_range("--limit", args.limit, 1, integer=True)
    folder = Path(args.folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; give the --out folder of an opendaam command")
    from opendaam.report import write_html

    path = write_html(folder, args.out, title=args.title, limit=args.limit)
    print(f"wrote {path}")
    return 0
