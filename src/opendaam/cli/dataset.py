"""``opendaam dataset``: write an example spec, check a spec, generate a synthetic segmentation dataset,
merge shards.

* ``opendaam dataset init SPEC.yaml [--example NAME]``: write one of the bundled example specs to edit;
* ``opendaam dataset check SPEC``: validate a spec against its model's config files, list its items, and
  say which optional packages generating it needs;
* ``opendaam dataset generate SPEC --out DIR``: generate (or finish) the dataset;
* ``opendaam dataset merge DIR``: join the shard manifests, filter, write exports and the card.

Sharding: start N processes with ``--rank R --world-size N`` (or ``RANK``/``WORLD_SIZE``), then run
``merge``; or ``accelerate launch --multi_gpu --num_processes N -m opendaam.cli dataset generate ...``
(``--multi_gpu`` is needed on machines without GPUs too: without it accelerate starts one process).
Each shard holds its own lock; one process or ``merge`` locks the whole folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from opendaam.cli._checks import (
    check_model,
    check_output_dir,
    check_prompt,
    check_size,
    in_range,
    missing_extras,
    require,
)

__all__ = ["EXAMPLES", "add_parser", "needed_extras", "run", "run_check", "run_generate", "run_init", "run_merge",
           "validate_spec"]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
"""The example specs shipped with the package."""


def add_parser(sub) -> None:
    """Register the ``dataset`` subcommand and its own subcommands."""
    p = sub.add_parser("dataset", help="generate, merge and export synthetic segmentation datasets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True)

    examples = sorted(path.stem for path in EXAMPLES.glob("*.yaml"))
    i = actions.add_parser("init", help="write an example spec to start from")
    i.add_argument("spec", help="file to write (.yaml); an existing file is not overwritten")
    i.add_argument("--example", default="thesis_toy_urban", choices=examples,
                   help="which bundled example (default: thesis_toy_urban, the thesis dataset on toy-urban)")
    i.set_defaults(run=run)

    g = actions.add_parser("generate", help="generate a dataset from a spec (resumes a partial one)")
    g.add_argument("spec", help="dataset spec (.yaml or .toml)")
    g.add_argument("--out", required=True, help="dataset folder")
    g.add_argument("--force", action="store_true",
                   help="regenerate a folder made from another spec, or add the dataset beside other files; files "
                        "opendaam did not write are never deleted or overwritten")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process, >= 1 (default: torch's)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: accelerate's, else cuda if any)")
    g.add_argument("--limit", type=int, default=None, help="stop after this many new items (rerun to continue)")
    g.add_argument("--rank", type=int, default=None, help="this process' shard, 0 .. world size - 1 (default: "
                   "accelerate or $RANK)")
    g.add_argument("--world-size", type=int, default=None, help="number of shards (default: accelerate or "
                   "$WORLD_SIZE)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(run=run)

    m = actions.add_parser("merge", help="join shard manifests, filter, write exports and the card")
    m.add_argument("dir", help="dataset folder")
    m.set_defaults(run=run)

    c = actions.add_parser("check", help="validate a spec against its model and list its items")
    c.add_argument("spec", help="dataset spec (.yaml or .toml)")
    c.add_argument("--items", action="store_true", help="print every (prompt, seed)")
    c.set_defaults(run=run)


def run(args) -> int:
    """Dispatch to the chosen action; file-system errors become one clear line and exit code 1."""
    actions = {"generate": run_generate, "merge": run_merge, "check": run_check, "init": run_init}
    try:
        return actions[args.action](args)
    except PermissionError as error:
        print(f"opendaam dataset: error: permission denied: {error.filename or error}; choose a folder you may "
              "write to", file=sys.stderr)
        return 1
    except OSError as error:
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            raise
        print(f"opendaam dataset: error: {error}", file=sys.stderr)
        return 1


def needed_extras(spec_path: str | Path, formats=()) -> list[str]:
    """The optional modules generating a spec needs: pyyaml for YAML specs, pycocotools and scipy for the COCO
    export, datasets for the Hugging Face export, accelerate when started by ``accelerate launch``.

    Examples:
        >>> needed_extras("spec.toml", ["coco", "huggingface"])
        ['pycocotools', 'scipy', 'datasets']
    """
    modules = [] if Path(spec_path).suffix == ".toml" else ["yaml"]
    needs = {"coco": ("pycocotools", "scipy"), "huggingface": ("datasets",)}
    modules += [m for fmt in ("coco", "huggingface") if fmt in formats for m in needs[fmt]]
    if "ACCELERATE_MIXED_PRECISION" in os.environ:
        modules.append("accelerate")
    return modules


def _load(path: str) -> object:
    """The spec, with pyyaml checked first for YAML files."""
    from opendaam.dataset.spec import load_spec

    if not Path(path).exists():
        raise FileNotFoundError(f"no dataset spec at {path}")
    if Path(path).suffix != ".toml":
        require("yaml", command="reading a YAML dataset spec")
    return load_spec(path)


def validate_spec(spec) -> None:
    """What the spec's model config files can tell without loading it: the model folder is complete,
    sizes are multiples of its size factor, every prompt fits its text encoder.

    Raises:
        FileNotFoundError, ValueError: one line naming the spec key and the problem.
    """
    from opendaam.dataset.spec import rendered_prompts

    info = check_model(spec.model_spec.id, base_dir=spec.base_dir, option="spec key 'model':")
    check_size(info, spec.height, spec.width, where="spec key ")
    check_prompt(info, rendered_prompts(spec), what="prompt")


def run_generate(args) -> int:
    """``opendaam dataset generate``."""
    from opendaam.dataset.generate import current_shard, generate
    from opendaam.dataset.spec import item_count

    in_range("--threads", args.threads, 1, integer=True)
    in_range("--limit", args.limit, 0, integer=True)
    spec = _load(args.spec)
    require(*needed_extras(args.spec, spec.outputs.formats), command="opendaam dataset generate")
    shard = current_shard(args.rank, args.world_size)
    check_output_dir(args.out)
    validate_spec(spec)
    if shard.world > 1:
        print(f"opendaam dataset generate: process {shard.rank} of {shard.world} (items {shard.rank}, "
              f"{shard.rank + shard.world}, ...) into {args.out}", flush=True)
    result = generate(
        spec, args.out, force=args.force, shard=shard, threads=args.threads, device=args.device,
        progress=not args.no_progress and getattr(args, "verbosity", 0) >= 0, limit=args.limit,
        spec_text=Path(args.spec).read_text(),
        spec_name="spec" + (Path(args.spec).suffix if Path(args.spec).suffix in (".toml", ".yml") else ".yaml"),
    )
    part = f" (process {shard.rank} of {shard.world})" if shard.world > 1 else ""
    print(f"{result.out}: generated {result.generated}, already finished {result.skipped}{part}; "
          f"{item_count(spec)} items in the spec")
    if result.finalized:
        print(f"the filters kept {result.kept} of {result.total} items; wrote {result.out}/manifest.jsonl, "
              f"README.md and exports: {', '.join(spec.outputs.formats) or 'none'}")
    elif shard.world > 1 and shard.state is None:
        print(f"when every process has finished, run: opendaam dataset merge {result.out}")
    elif shard.world > 1:
        print("process 0 merges the shards when all have finished")
    else:
        print(f"not finished yet: rerun the same command to continue ({result.out})")
    return 0


def run_merge(args) -> int:
    """``opendaam dataset merge``."""
    from opendaam.dataset.merge import finalize, load_dataset

    _, spec = load_dataset(args.dir)
    require(*needed_extras("spec.toml", spec.outputs.formats), command="opendaam dataset merge")
    result = finalize(args.dir)
    print(f"{args.dir}: {result['items']} items, the filters kept {result['kept']} and dropped {result['dropped']}; "
          f"exports: {', '.join(result['exports']) or 'none'}")
    return 0


def run_check(args) -> int:
    """``opendaam dataset check``: 0 when the spec can be generated here, 1 when packages are missing."""
    from opendaam.dataset.spec import expand_items, item_count, spec_hash

    spec = _load(args.spec)
    validate_spec(spec)
    count = item_count(spec)
    prompts = count // spec.seed_count
    print(f"{args.spec}: valid; {len(spec.classes)} classes, {prompts} prompts x "
          f"{spec.seed_count} seeds = {count} items; model {spec.model_spec.id}; method {spec.method}; "
          f"spec hash {spec_hash(spec)[:12]}")
    if args.items:
        for it in expand_items(spec):
            print(f"{it.key}\tseed {it.seed}\t{it.prompt}\t[{', '.join(it.classes)}]")
    missing = missing_extras(*needed_extras(args.spec, spec.outputs.formats))
    if missing:
        try:
            require(*missing, command="generating it")
        except RuntimeError as error:
            print(f"opendaam dataset check: cannot generate here yet: {error}", file=sys.stderr)
        return 1
    return 0


def run_init(args) -> int:
    """``opendaam dataset init``: copy a bundled example spec."""
    target = Path(args.spec)
    if target.exists():
        raise ValueError(f"{target} exists; choose a new file name (init never overwrites)")
    check_output_dir(target.parent, option="spec")
    from opendaam._io import atomic_write_with

    text = (EXAMPLES / f"{args.example}.yaml").read_text()
    atomic_write_with(target, lambda tmp: tmp.write_text(text))
    print(f"wrote {target} (the {args.example} example); edit it, then: opendaam dataset check {target}")
    return 0
