"""``opendaam experiment thesis``: the thesis protocol in one command (dataset, tokens, evaluation, tables)."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["add_parser", "run"]


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
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--strength", type=float, default=0.5,
                   help="img2img strength from the rendered scenes (0.5 keeps person and rider shapes in place)")
    p.add_argument("--seed0", type=int, default=None,
                   help="first seed (default: 1000000 with the bundled world, whose model trained on seeds "
                        "below 8000; else 0)")
    p.add_argument("--epochs", type=int, default=300, help="token optimization epochs (upper bound)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    p.set_defaults(run=run)


def run(args) -> int:
    """Run the experiment and draw its figures."""
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
