"""``opendaam experiment thesis|segmenter``: the thesis protocol (dataset, tokens, evaluation, tables), or the
synthetic-to-real experiment (segmenters trained on real and on synthetic data, scored on held-out scenes)."""

from __future__ import annotations

import time
from pathlib import Path

from opendaam.cli._checks import MAX_SEED, check_model, check_output_dir, in_range, require

__all__ = ["add_parser", "run", "run_segmenter", "validate", "validate_segmenter"]


def add_parser(sub) -> None:
    """Register the ``experiment`` subcommand and its two experiments."""
    top = sub.add_parser("experiment", help="run the thesis or the synthetic-to-real experiment end to end",
                         description=__doc__)
    names = top.add_subparsers(dest="name", required=True, metavar="{thesis,segmenter}")
    p = names.add_parser("thesis", help="the thesis protocol: maps of every method scored against exact masks",
                         description="The thesis protocol in one command: dataset, tokens, evaluation, tables.")
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
    _add_segmenter(names)


def _add_segmenter(names) -> None:
    from opendaam.segmenter import LABELLERS, SegmenterConfig

    d = SegmenterConfig()
    p = names.add_parser(
        "segmenter", help="train segmenters on real and on synthetic data, score them on held-out scenes",
        description="The synthetic-to-real experiment on toy-urban: SegFormer trained on rendered scenes with exact "
        "labels, on generated images labelled by opendaam (one set per labeller), and on a few real scenes with "
        "and without synthetic data; scored on held-out rendered scenes. Writes summary.json, tables.md, "
        "miou.csv and miou.png; rerun the same command to resume.")
    p.add_argument("--model", default="toy-urban", help="toy-urban, or a folder of a model trained on its world")
    p.add_argument("--per-class", type=int, default=d.train_per_class,
                   help=f"N / classes: images per class of the real and of each synthetic set ({d.train_per_class})")
    p.add_argument("--few-real", type=int, default=d.few_real_per_class,
                   help=f"real scenes per class of the small real set ({d.few_real_per_class})")
    p.add_argument("--test", type=int, default=d.test_size, help=f"held-out scenes scored ({d.test_size})")
    p.add_argument("--labellers", nargs="+", choices=LABELLERS, default=list(d.labellers),
                   help="synthetic sets, one per labeller (default: all)")
    p.add_argument("--tokens", default=None, help="folder of ready tokens <class>.safetensors (default: optimize "
                   f"them on {d.token_per_class} img2img scenes per class)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help=f"optimizer steps of every segmenter, the same for every set ({d.train_steps})")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's own)")
    p.add_argument("--min-confidence", type=float, default=None,
                   help="drop synthetic images whose class mask is weaker, in [0, 1] (default: keep all, equal N)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, >= 1")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.set_defaults(run=run_segmenter)


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


def validate_segmenter(args) -> None:
    """Packages and options of ``experiment segmenter``, before any work.

    Raises:
        MissingExtra: datasets (the exports are read with it) or matplotlib (the figure) is missing.
        ValueError, FileNotFoundError: one line naming the problem.
    """
    require("datasets", "matplotlib", command="opendaam experiment segmenter")
    in_range("--per-class", args.per_class, 1, integer=True)
    in_range("--few-real", args.few_real, 1, args.per_class, integer=True)
    in_range("--test", args.test, 1, integer=True)
    in_range("--train-steps", args.train_steps, 1, integer=True)
    in_range("--steps", args.steps, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    in_range("--min-confidence", args.min_confidence, 0, 1)
    if args.model != "toy-urban" and not Path(args.model).is_dir():
        raise ValueError("the segmenter experiment scores on the toy world's rendered scenes: use --model toy-urban "
                         "or the folder of a model trained on that world")
    check_output_dir(args.out)
    check_model(args.model)


def _segmenter_config(args):
    from opendaam.segmenter import SegmenterConfig

    return SegmenterConfig(train_per_class=args.per_class, few_real_per_class=args.few_real, test_size=args.test,
                           labellers=tuple(dict.fromkeys(args.labellers)), tokens=args.tokens, model=args.model,
                           min_confidence=args.min_confidence,
                           train_steps=args.train_steps, steps=args.steps, threads=args.threads)


def run_segmenter(args) -> int:
    """Run the synthetic-to-real experiment and draw its figure."""
    validate_segmenter(args)
    from opendaam.models import load_pipeline, set_threads
    from opendaam.segmenter import check_config
    from opendaam.segmenter import run_segmenter as run_experiment
    from opendaam.viz import plot_segmenter

    config = _segmenter_config(args)
    check_config(config, args.out)  # options and the folder, before the model loads
    set_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    summary = run_experiment(pipe, args.out, config, progress=args.verbosity >= 0)
    out = Path(args.out)
    plot_segmenter(summary, out / "miou.png")
    print((out / "tables.md").read_text())
    print(f"finished in {summary['time_s']['total']:.0f} s; tables, miou.png and summary.json in {out}")
    return 0
