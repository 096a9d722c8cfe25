"""``opendaam evaluate``: threshold curves, max mIoU and AUC per class and method, with baselines and plots."""

from __future__ import annotations

import json
from pathlib import Path

from opendaam.cli._checks import check_model, check_output_dir, check_record_file, check_token_file, in_range, require

__all__ = ["add_parser", "run", "validate"]


def add_parser(sub) -> None:
    """Register the ``evaluate`` subcommand."""
    p = sub.add_parser("evaluate", help="evaluate maps against masks", description=__doc__)
    p.add_argument("--records", required=True, help="folder of records (*.safetensors, searched recursively)")
    p.add_argument("--masks", required=True, help="folder of binary masks <id>.png")
    p.add_argument("--methods", nargs="+", default=["daam", "linear"],
                   help="daam, linear, open_vocab, daam_opt, linear_opt")
    p.add_argument("--tokens", nargs="+", default=None,
                   help="optimized tokens (*.safetensors files, or folders of them), one per method and class")
    p.add_argument("--model", default=None,
                   help="pipeline for open_vocab and daam_opt (default: the model the records name)")
    p.add_argument("--class", dest="cls", default=None, help="class of every record (default: record metadata)")
    p.add_argument("--train", type=int, default=0,
                   help="the first N images per class are training images: they make the class prior and are "
                        "left out of the evaluation (0: the prior is in-sample)")
    p.add_argument("--pool", type=int, default=None,
                   help="leave the first N images per class out of the evaluation (default: --train); the thesis "
                        "experiment's tables use --train 2 --pool 5, its training pool")
    p.add_argument("--tau-step", type=float, default=0.05,
                   help="spacing of the mask thresholds tau in (0, 1] for the curves (0.05: 21 thresholds)")
    p.add_argument("--per-layer", action="store_true", help="with --per-step: the block x step mIoU matrix")
    p.add_argument("--per-step", action="store_true", help="with --per-layer: the block x step mIoU matrix")
    p.add_argument("--threads", type=int, default=1, help="torch threads, >= 1")
    p.add_argument("--out", required=True, help="output folder for tables, summary and plots")
    p.set_defaults(run=run)


_NEEDS_MODEL = {"open_vocab", "daam_opt"}


def _model(args, records: dict) -> str:
    """``--model``, else the one model every record names; a clear error when neither exists."""
    if args.model:
        return args.model
    names = {r.meta.get("model") for r in records.values()}
    if len(names) == 1 and None not in names:
        return names.pop()
    needs = " ".join(m for m in args.methods if m in _NEEDS_MODEL)
    raise ValueError(f"--methods {needs} need the pipeline the records were traced with, and the records name "
                     f"{'no single model' if len(names) != 1 else 'none'}: add --model (a hub id, a folder, "
                     "or toy-urban)")


def _token_files(paths: list[str]) -> list[Path]:
    """Token files from files and folders, in the given order (folders sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.glob("*.safetensors"))
        elif path.exists():
            files.append(path)
        else:
            raise FileNotFoundError(f"no token file or folder {path}")
    return files


def validate(args) -> None:
    """Packages, options, paths and record files, before any work.

    Raises:
        MissingExtra: matplotlib (for the plots) is not installed.
        ValueError, FileNotFoundError: one line naming the problem.
    """
    require("matplotlib", command="opendaam evaluate")
    in_range("--threads", args.threads, 1, integer=True)
    in_range("--tau-step", args.tau_step, 0, 1, low_open=True)
    in_range("--train", args.train, 0, integer=True)
    in_range("--pool", args.pool, 0, integer=True)
    if args.pool is not None and args.pool < args.train:
        raise ValueError(f"--pool {args.pool} is smaller than --train {args.train}: training images would be tested")
    check_output_dir(args.out)
    if args.model:
        check_model(args.model)
    from opendaam.cli.optimize import find_pairs

    for _, path, _ in find_pairs(args.records, args.masks):
        check_record_file(path)
    for path in _token_files(args.tokens or []):
        check_token_file(path)


def run(args) -> int:
    """Evaluate and write tables, summary and figures."""
    validate(args)

    from opendaam.cache import load_record
    from opendaam.cli.optimize import find_pairs
    from opendaam.experiments import Item, ablation, evaluate, split_items, summarize, write_tables
    from opendaam.metrics import default_thresholds
    from opendaam.models import load_pipeline, set_threads
    from opendaam.optimize import load_token
    from opendaam.viz import plot_ablation, plot_curves

    set_threads(args.threads)
    pairs = find_pairs(args.records, args.masks)
    records, items = {}, []
    for rid, rpath, mpath in pairs:
        record = load_record(rpath)
        cls = args.cls or record.meta.get("class")
        if cls is None:
            raise ValueError(f"record {rid} does not name its class: pass --class")
        records[rid] = record
        items.append(Item(id=rid, cls=cls, prompt=record.meta.get("prompt") or "", seed=record.meta.get("seed", 0),
                          record=str(rpath.resolve()), mask=str(mpath.resolve()), image=""))
    split = split_items(items, lambda item: records[item.id].image_size, args.train, args.pool)
    pipe = load_pipeline(_model(args, records)) if args.model or _NEEDS_MODEL & set(args.methods) else None
    tokens, sources = {}, {}
    for path in _token_files(args.tokens or []):
        token = load_token(path, pipe=pipe)
        key = (token.meta.get("method", "linear"), token.label)
        if key in sources:
            raise ValueError(f"two {key[0]} tokens for {key[1]!r}: {sources[key]} and {path}; pass one file per "
                             "method and class (e.g. --tokens DIR/*_2.safetensors for the 2-image tokens)")
        tokens[key], sources[key] = token, path
    taus = default_thresholds(args.tau_step)
    ev = evaluate(split.test, "/", args.methods, pipe=pipe, tokens=tokens, priors=split.priors, thresholds=taus,
                  records=records)
    summary = {"thresholds": taus.tolist(), "methods": summarize(ev), "prior_in_sample": args.train == 0,
               "test_ids": [i.id for i in split.test]}
    out = Path(args.out)
    write_tables(summary, out)
    plot_curves(summary, out / "curves.png")
    if args.per_layer or args.per_step:
        result = ablation(split.test, "/", taus, records=records)
        (out / "ablation.json").write_text(json.dumps(result, indent=1))
        with open(out / "ablation.csv", "w") as f:
            f.write("block," + ",".join(str(s) for s in result["steps"]) + "\n")
            for block, row in zip(result["blocks"], result["miou"], strict=True):
                f.write(block + "," + ",".join(f"{v:.2f}" for v in row) + "\n")
        plot_ablation(result, out / "ablation.png")
    print((out / "tables.md").read_text())
    return 0
