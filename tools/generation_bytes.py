"""Byte-compare what two opendaam checkouts generate: a small dataset (with and without refinement) and the
thesis experiment's items (toy-urban img2img from rendered scenes).

Run ``make`` once per checkout (its ``src`` first on ``PYTHONPATH``), then ``compare`` the two folders: every
file must have the same bytes, except the run-dependent parts, which are compared without them: the manifests'
timing field and opendaam version, and ``dataset.json``'s version. Both runs load toy-urban from one copy outside
the checkouts, since records name the model folder they were made with.

Usage::

    PYTHONPATH=/work/old/src python tools/generation_bytes.py make /tmp/gen-old
    PYTHONPATH=src python tools/generation_bytes.py make /tmp/gen-new
    python tools/generation_bytes.py compare /tmp/gen-old /tmp/gen-new
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

MODEL = Path(tempfile.gettempdir()) / "generation-bytes-toy-urban"
"""Where both runs load the bundled model from."""

DATASET = {
    "model": str(MODEL), "steps": 4, "height": 64, "width": 64, "seeds": [11, 12, 13],
    "classes": [{"name": "car", "prompts": ["a {} in an urban environment"]},
                {"name": "person", "prompts": ["a {} in an urban environment"]}],
    "outputs": {"formats": []},
}
"""2 classes x 3 seeds on the bundled model, small enough for a minute on one core."""


def make(out: Path) -> None:
    """Generate the three outputs under ``out`` with the code on ``sys.path``."""
    import opendaam
    from opendaam.dataset.generate import generate
    from opendaam.dataset.spec import parse_spec
    from opendaam.experiments import ToyWorldAnnotator, generate_items
    from opendaam.models import BUNDLED_MODELS, load_pipeline, set_threads

    print("opendaam from", opendaam.__file__, file=sys.stderr)
    if not MODEL.exists():
        shutil.copytree(BUNDLED_MODELS["toy-urban"], MODEL)
    set_threads(1)
    for name, extra in (("dataset", {}), ("dataset-refine", {"refine": {"layers": ["up_blocks.1"], "power": 1}})):
        generate(parse_spec({**DATASET, **extra}), out / name, progress=False)
    pipe = load_pipeline(MODEL, img2img=True)
    pipe.set_progress_bar_config(disable=True)
    generate_items(pipe, out / "experiment", ("car", "person"), 2, annotator=ToyWorldAnnotator(), seed0=100,
                   call={"num_inference_steps": 4}, progress=False)


def _comparable(path: Path) -> bytes:
    """The bytes of a file that do not depend on the run (timings, version strings)."""
    data = path.read_bytes()
    if path.suffix == ".jsonl":
        lines = []
        for line in data.decode().splitlines():
            entry = json.loads(line)
            entry.pop("timing", None)
            entry.get("provenance", {}).pop("opendaam", None)
            lines.append(json.dumps(entry, sort_keys=True))
        return "\n".join(lines).encode()
    if path.name == "dataset.json":
        header = json.loads(data)
        header.pop("opendaam", None)
        return json.dumps(header, sort_keys=True).encode()
    if path.name == "card.md" or path.name == "README.md":
        return b""  # the dataset card names the version; its numbers come from the manifest compared above
    return data


def compare(old: Path, new: Path) -> int:
    """Print one line per file (same / DIFFERENT / missing); returns the number of mismatches."""
    files = sorted({p.relative_to(old) for p in old.rglob("*") if p.is_file() and ".opendaam" not in p.parts}
                   | {p.relative_to(new) for p in new.rglob("*") if p.is_file() and ".opendaam" not in p.parts})
    bad = 0
    for rel in files:
        a, b = old / rel, new / rel
        if not a.exists() or not b.exists():
            print(f"missing in {'old' if not a.exists() else 'new'}: {rel}")
            bad += 1
            continue
        same = _comparable(a) == _comparable(b)
        raw = "bytes" if a.read_bytes() == b.read_bytes() else "content without timing/version"
        print(f"{'same' if same else 'DIFFERENT'} ({raw if same else 'bytes'}): {rel}  "
              f"sha256 {hashlib.sha256(b.read_bytes()).hexdigest()[:12]}")
        bad += not same
    print(f"{len(files)} files, {bad} differ")
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("make", help="generate the outputs").add_argument("out", type=Path)
    cmp = sub.add_parser("compare", help="compare two output folders")
    cmp.add_argument("old", type=Path)
    cmp.add_argument("new", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.command == "make":
        make(args.out)
    else:
        sys.exit(1 if compare(args.old, args.new) else 0)


if __name__ == "__main__":
    main()
