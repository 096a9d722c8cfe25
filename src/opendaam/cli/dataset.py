"""``opendaam dataset``: generate a synthetic segmentation dataset from a spec, merge shards, check a spec.

* ``opendaam dataset generate SPEC --out DIR``: generate (or finish) the dataset; under
  ``accelerate launch --num_processes N`` (or with ``RANK``/``WORLD_SIZE`` set) each process makes its share;
* ``opendaam dataset merge DIR``: join the shard manifests, filter, write exports and the card;
* ``opendaam dataset check SPEC``: validate a spec and list its items without generating.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["add_parser", "run", "run_check", "run_generate", "run_merge"]


def add_parser(sub) -> None:
    """Register the ``dataset`` subcommand and its own subcommands."""
    p = sub.add_parser("dataset", help="generate, merge and export synthetic segmentation datasets",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True)

    g = actions.add_parser("generate", help="generate a dataset from a spec (resumes a partial one)")
    g.add_argument("spec", help="dataset spec (.yaml or .toml)")
    g.add_argument("--out", required=True, help="dataset folder")
    g.add_argument("--force", action="store_true", help="write into a folder made from another spec")
    g.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: accelerate's, else cuda if any)")
    g.add_argument("--limit", type=int, default=None, help="stop after this many new items (rerun to continue)")
    g.add_argument("--rank", type=int, default=None, help="this process' shard (default: accelerate or $RANK)")
    g.add_argument("--world-size", type=int, default=None, help="number of shards (default: accelerate or "
                   "$WORLD_SIZE)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(run=run)

    m = actions.add_parser("merge", help="join shard manifests, filter, write exports and the card")
    m.add_argument("dir", help="dataset folder")
    m.set_defaults(run=run)

    c = actions.add_parser("check", help="validate a spec and list its items")
    c.add_argument("spec", help="dataset spec (.yaml or .toml)")
    c.add_argument("--items", action="store_true", help="print every (prompt, seed)")
    c.set_defaults(run=run)


def run(args) -> int:
    """Dispatch to the chosen action; file-system errors become one clear line and exit code 1."""
    actions = {"generate": run_generate, "merge": run_merge, "check": run_check}
    try:
        return actions[args.action](args)
    except PermissionError as error:
        print(f"opendaam dataset: error: permission denied: {error.filename or error}; choose a folder you may "
              "write to", file=sys.stderr)
        return 1
    except OSError as error:
        if isinstance(error, FileNotFoundError):
            raise
        print(f"opendaam dataset: error: {error}", file=sys.stderr)
        return 1


def run_generate(args) -> int:
    """``opendaam dataset generate``."""
    from opendaam.dataset.generate import current_shard, generate
    from opendaam.dataset.spec import load_spec

    spec = load_spec(args.spec)
    shard = current_shard(args.rank, args.world_size)
    result = generate(
        spec, args.out, force=args.force, shard=shard, threads=args.threads, device=args.device,
        progress=not args.no_progress, limit=args.limit, spec_text=Path(args.spec).read_text(),
        spec_name="spec" + (Path(args.spec).suffix if Path(args.spec).suffix in (".toml", ".yml") else ".yaml"),
    )
    part = f" (process {shard.rank} of {shard.world})" if shard.world > 1 else ""
    print(f"{result.out}: generated {result.generated}, already finished {result.skipped}{part}; "
          f"{result.total} items in the dataset")
    if result.finalized:
        print(f"wrote {result.out}/manifest.jsonl, README.md and exports: {', '.join(spec.outputs.formats) or 'none'}")
    elif shard.world > 1 and shard.state is None:
        print(f"when every process has finished, run: opendaam dataset merge {result.out}")
    elif shard.world > 1:
        print("process 0 merges the shards when all have finished")
    else:
        print(f"not finished yet: rerun the same command to continue ({result.out})")
    return 0


def run_merge(args) -> int:
    """``opendaam dataset merge``."""
    from opendaam.dataset.merge import finalize

    result = finalize(args.dir)
    print(f"{args.dir}: {result['items']} items, {result['kept']} kept, {result['dropped']} dropped; exports: "
          f"{', '.join(result['exports']) or 'none'}")
    return 0


def run_check(args) -> int:
    """``opendaam dataset check``."""
    from opendaam.dataset.spec import expand_items, load_spec, spec_hash

    spec = load_spec(args.spec)
    items = expand_items(spec)
    prompts = len(items) // len(spec.seed_list)
    print(f"{args.spec}: valid; {len(spec.classes)} classes, {prompts} prompts x "
          f"{len(spec.seed_list)} seeds = {len(items)} items; model {spec.model_spec.id}; method {spec.method}; "
          f"spec hash {spec_hash(spec)[:12]}")
    if args.items:
        for it in items:
            print(f"{it.key}\tseed {it.seed}\t{it.prompt}\t[{', '.join(it.classes)}]")
    return 0
