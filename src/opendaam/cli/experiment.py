"""``opendaam experiment thesis``: the thesis protocol in one command (dataset, tokens, evaluation, tables)."""

from __future__ import annotations

import time
from pathlib import Path

from opendaam.cli._checks import MAX_SEED, check_model, check_output_dir, in_range, require

__all__ = ["add_parser", "run", "validate"]


def add_parser(sub) -> None:
    """Register the ``experiment`` subcommand."""
    p = sub.add_parser("experiment", help="run the thesis experiment end to end", description=__doc__)
    p.add_argument("name", choices=["thesis"], help="which experiment")
    p.add_argument("--model", default="toy-urban", help="hub id, folder or bundled name")
    p.add_argument("--masks", default=None,
                   help="folder of your masks <class>_<seed>.png (any model); default: the bundled world's")
    p.add_argument("--per-class", type=int, default=50, help="images per class (the thesis: 50)")
    p.add_argument("--train", type=int, nargs="+", default=[1, 2, 5], help="training images for the tokens")
    p.add_argument("--report-train", type=int, default=None, help="token size used in tables 4.2/4.3")
    p.add_argument("--classes", nargs="+", default=None, help="class names (default: the thesis' four)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's own)")
    p.add_argument("--strength", type=float, default=0.5,
                   help="img2img strength from the rendered scenes (0.5 keeps person and rider shapes in place)")
    p.add_argument("--seed0", type=int, default=None,
                   help="first seed (default: 1000000 with the bundled world, whose model trained on seeds "
                        "below 8000; else 0)")
    p.add_argument("--epochs", type=int, default=300, help="token optimization epochs (upper bound)")
    p.add_argument("--threads", type=int, default=1, help="torch threads, >= 1")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.set_defaults(run=run)


def validate(args) -> None:
    """Packages and options, before any work.

    Raises:
        MissingExtra: matplotlib (for the curves) is not installed.
        ValueError, FileNotFoundError: one line naming the problem.
    """
    require("matplotlib", command="opendaam experiment")
    in_range("--per-class", args.per_class, 1, integer=True)
    for n in args.train:
        in_range("--train", n, 1, args.per_class, integer=True)
    in_range("--report-train", args.report_train, 1, integer=True)
    if args.report_train is not None and args.report_train not in args.train:
        raise ValueError(f"--report-train {args.report_train} is not one of --train {' '.join(map(str, args.train))}")
    in_range("--steps", args.steps, 1, integer=True)
    in_range("--strength", args.strength, 0, 1, low_open=True)
    in_range("--seed0", args.seed0, 0, MAX_SEED - args.per_class, integer=True)
    in_range("--epochs", args.epochs, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    if args.masks is None and args.model != "toy-urban":
        raise ValueError("only toy-urban has a bundled world to annotate its images: pass --masks DIR")
    check_output_dir(args.out)
    check_model(args.model)


def run(args) -> int:
    """Run the experiment and draw its figures."""
    validate(args)
    from opendaam.experiments import THESIS_CLASSES, ThesisConfig, ToyWorldAnnotator, run_thesis
    from opendaam.models import load_pipeline, set_threads
    from opendaam.toyworld.train import HELD_OUT
    from opendaam.viz import plot_curves

    set_threads(args.threads)
    started = time.perf_counter()
    bundled_world = args.masks is None
    if bundled_world and args.model != "toy-urban":
        raise ValueError("only toy-urban has a bundled world to annotate its images: pass --masks DIR")
    pipe = load_pipeline(args.model, img2img=bundled_world)
    pipe.set_progress_bar_config(disable=True)
    report = args.report_train or (2 if 2 in args.train else args.train[0])
    cfg = ThesisConfig(classes=tuple(args.classes or THESIS_CLASSES), per_class=args.per_class,
                       train_sizes=tuple(args.train), report_train=report, steps=args.steps,
                       strength=args.strength, optimize_epochs=args.epochs,
                       seed0=args.seed0 if args.seed0 is not None else (HELD_OUT if bundled_world else 0))
    annotator = ToyWorldAnnotator(args.strength) if bundled_world else None
    summary = run_thesis(pipe, args.out, cfg, annotator=annotator, masks_dir=args.masks)
    out = Path(args.out)
    plot_curves(summary, out / "curves.png")
    for method in summary["methods"]:
        plot_curves(summary, out / f"curves_{method}.png", methods=[method])
    print((out / "tables.md").read_text())
    print(f"finished in {time.perf_counter() - started:.0f} s; tables, curves and summary.json in {out}")
    return 0
