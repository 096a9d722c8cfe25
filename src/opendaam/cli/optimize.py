"""``opendaam optimize``: optimize a token on records and masks, save it as safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

__all__ = ["add_parser", "find_pairs", "run"]


def add_parser(sub) -> None:
    """Register the ``optimize`` subcommand."""
    p = sub.add_parser("optimize", help="optimize a token whose maps match masks", description=__doc__)
    p.add_argument("--records", required=True, help="folder of records (*.safetensors, searched recursively)")
    p.add_argument("--masks", required=True,
                   help="folder of masks named like the records (<id>.png; non-zero pixels are the object)")
    p.add_argument("--class", dest="label", required=True, help="class name stored with the token")
    p.add_argument("--label-id", type=int, default=None,
                   help="masks are label maps: the object is the pixels equal to this id")
    p.add_argument("--method", default="linear", choices=["linear", "open_vocab"])
    p.add_argument("--train", type=int, default=None, help="use the first N records (sorted by id)")
    p.add_argument("--init", default=None, help="initial word (default: the class name)")
    p.add_argument("--model", default=None, help="pipeline (needed for open_vocab and unseen init words)")
    p.add_argument("--loss", default=None, help="bce (default), ce (thesis eq. 3.10), soft_iou, margin")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--explain", type=int, default=0, help="print the N vocabulary words nearest the token")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True, help="output token file (.safetensors)")
    p.set_defaults(run=run)


def record_id(path: Path, root: Path) -> str:
    """A record's id: its file stem, or its folder's path when the file is ``record.safetensors``.

    Example:
        >>> record_id(Path("/d/car0/record.safetensors"), Path("/d")), record_id(Path("/d/x.safetensors"), Path("/d"))
        ('car0', 'x')
    """
    rel = path.relative_to(root)
    if path.stem == "record":
        return str(rel.parent).replace("\\", "/")
    return str(rel.with_suffix("")).replace("\\", "/")


def find_pairs(records_dir: str | Path, masks_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """(id, record path, mask path) for every record, sorted by id.

    Raises:
        FileNotFoundError: no records, or masks missing for some records (all of them listed).
    """
    root, mroot = Path(records_dir), Path(masks_dir)
    paths = sorted(root.rglob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no records (*.safetensors) under {root}")
    pairs, missing = [], []
    for path in paths:
        rid = record_id(path, root)
        mask = mroot / f"{rid}.png"
        if mask.exists():
            pairs.append((rid, path, mask))
        else:
            missing.append(rid)
    if missing:
        raise FileNotFoundError(f"no mask <id>.png in {mroot} for records: {', '.join(missing)}")
    return sorted(pairs)


def load_mask(path: Path, label_id: int | None) -> np.ndarray:
    """A boolean mask from a PNG: non-zero pixels, or pixels equal to ``label_id``."""
    from PIL import Image

    array = np.array(Image.open(path))
    if array.ndim == 3:
        array = array[..., 0]
    return array == label_id if label_id is not None else array > 0


def run(args) -> int:
    """Optimize and save the token."""
    from opendaam.cache import load_record
    from opendaam.models import load_pipeline, set_threads
    from opendaam.optimize import nearest_words, optimize_token

    set_threads(args.threads)
    pairs = find_pairs(args.records, args.masks)
    if args.train is not None:
        if args.train > len(pairs):
            raise ValueError(f"--train {args.train} but only {len(pairs)} records have masks")
        pairs = pairs[: args.train]
    records = [load_record(p) for _, p, _ in pairs]
    masks = [load_mask(m, args.label_id) for _, _, m in pairs]
    pipe = load_pipeline(args.model) if args.model else None
    options = {k: v for k, v in dict(loss=args.loss, lr=args.lr, epochs=args.epochs).items() if v is not None}
    token = optimize_token(records, masks, pipe=pipe, init=args.init or args.label, label=args.label,
                           method=args.method, image_ids=[i for i, _, _ in pairs], **options)
    if args.explain:
        if pipe is None:
            raise ValueError("--explain needs --model to encode the vocabulary")
        token.meta["nearest_words"] = nearest_words(token, pipe, k=args.explain)
    path = token.save(args.out)
    last = token.history[token.meta["best_epoch"]] if token.history else {}
    print(json.dumps({"token": str(path), "loss": token.meta["loss"], "best_epoch": token.meta["best_epoch"],
                      "train_miou": last.get("train_miou"), "train_images": token.meta["train_images"],
                      "nearest_words": token.meta.get("nearest_words")}, indent=2))
    return 0
