"""``opendaam optimize``: optimize a token on records and masks, save it as safetensors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from opendaam.cli._checks import check_model, check_output_file, check_record_file, in_range

__all__ = ["add_parser", "find_pairs", "load_mask", "record_class", "run", "select_class", "validate"]


def add_parser(sub) -> None:
    """Register the ``optimize`` subcommand."""
    p = sub.add_parser("optimize", help="optimize a token whose maps match masks", description=__doc__)
    p.add_argument("--records", required=True, help="folder of records (*.safetensors, searched recursively)")
    p.add_argument("--masks", required=True,
                   help="folder of masks named like the records (<id>.png; non-zero pixels are the object)")
    p.add_argument("--class", dest="label", required=True,
                   help="the class: only records of this class are used (their metadata's class, or for records "
                        "without one, a prompt naming it); stored with the token")
    p.add_argument("--label-id", type=int, default=None,
                   help="masks are label maps: the object is the pixels equal to this id")
    p.add_argument("--method", default="linear", choices=["linear", "open_vocab"],
                   help="which maps the token is optimized for (open_vocab needs --model)")
    p.add_argument("--train", type=int, default=None, help="use the first N records of the class (sorted by id)")
    p.add_argument("--init", default=None, help="initial word (default: the class name)")
    p.add_argument("--model", default=None, help="pipeline (needed for open_vocab and unseen init words)")
    p.add_argument("--loss", default=None, help="bce (default), ce (thesis eq. 3.10), soft_iou, margin")
    p.add_argument("--lr", type=float, default=None, help="learning rate, > 0 (default: the method's own)")
    p.add_argument("--epochs", type=int, default=None, help="optimization epochs, >= 1 (default: the method's own)")
    p.add_argument("--explain", type=int, default=0, help="print the N vocabulary words nearest the token")
    p.add_argument("--threads", type=int, default=None, help="torch threads, >= 1 (default: torch's choice)")
    p.add_argument("--out", required=True, help="output token file (.safetensors)")
    p.set_defaults(run=run)


def record_id(path: Path, root: Path) -> str:
    """A record's id: its file stem, or its folder's path when the file is ``record.safetensors``.

    Examples:
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
    """A boolean mask from a PNG: non-zero pixels, or pixels equal to ``label_id``.

    Raises:
        ValueError: the file is not a PNG image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if image.format != "PNG":
                raise ValueError(f"mask {path} is a {image.format} image, not a PNG; save masks as PNG")
            array = np.array(image)
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"mask {path} is not a readable PNG image ({error})") from None
    if array.ndim == 3:
        array = array[..., 0]
    return array == label_id if label_id is not None else array > 0


def _words(text: str) -> list[str]:
    """Lower-case words of a text, for matching a class name against a prompt."""
    return re.findall(r"[a-z0-9]+", text.lower())


def record_class(meta: dict, label: str) -> str | None:
    """A record's class: its metadata's ``class``, else ``label`` when its prompt names it, else None.

    Examples:
        >>> record_class({"class": "car"}, "person"), record_class({"prompt": "a person walking"}, "person")
        ('car', 'person')
    """
    if meta.get("class"):
        return str(meta["class"])
    wanted, words = _words(label), _words(meta.get("prompt") or "")
    found = any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))
    return label if wanted and found else None


def select_class(pairs: list[tuple[str, Path, Path]], label: str) -> list[tuple[str, Path, Path]]:
    """The pairs whose record is of class ``label`` (headers read without tensors; corrupt files refused).

    Raises:
        ValueError: a record file is not an opendaam record, or no record is of the class (the classes
            found are named).
    """
    chosen, found = [], set()
    for pair in pairs:
        cls = record_class(check_record_file(pair[1]).get("meta", {}), label)
        found.add(cls)
        if cls == label:
            chosen.append(pair)
    if not chosen:
        named = sorted(c for c in found if c)
        raise ValueError(f"--class {label!r}: none of the {len(pairs)} records is of this class (records name "
                         f"{', '.join(named) if named else 'no class'}, and no prompt names {label!r}); choose "
                         "one of those, or point --records at records of this class")
    return chosen


def validate(args) -> list[tuple[str, Path, Path]]:
    """Options, records (of ``--class``), masks and the initial word, before any model loads; the pairs.

    Raises:
        ValueError, FileNotFoundError: one line naming the problem and the option to change.
    """
    in_range("--threads", args.threads, 1, integer=True)
    in_range("--epochs", args.epochs, 1, integer=True)
    in_range("--lr", args.lr, 0, low_open=True)
    in_range("--train", args.train, 1, integer=True)
    in_range("--explain", args.explain, 0, integer=True)
    if not args.label.strip():
        raise ValueError("--class is empty; give the class name, e.g. --class car")
    check_output_file(args.out)
    if args.model:
        check_model(args.model)
    if args.method == "open_vocab" and not args.model:
        raise ValueError("--method open_vocab needs the pipeline's attention keys: add --model (the pipeline "
                         "the records were made with)")
    if args.explain and not args.model:
        raise ValueError("--explain needs --model to encode the vocabulary")
    pairs = select_class(find_pairs(args.records, args.masks), args.label)
    if args.train is not None:
        if args.train > len(pairs):
            raise ValueError(f"--train {args.train} but only {len(pairs)} records of class {args.label!r} have "
                             "masks")
        pairs = pairs[: args.train]
    init = args.init or args.label
    if not args.model:
        prompts = [check_record_file(p).get("meta", {}).get("prompt") or "" for _, p, _ in pairs]
        if not any(record_class({"prompt": prompt}, init) for prompt in prompts):
            raise ValueError(f"the initial word {init!r} is in none of the records' prompts: add --model (the "
                             "pipeline the records were made with) to encode it, or --init a word of the prompts")
    for rid, _, mask_path in pairs:
        if not load_mask(mask_path, args.label_id).any():
            raise ValueError(f"mask {mask_path} (record {rid}) is empty: the object must cover at least one pixel"
                             + (f" equal to --label-id {args.label_id}" if args.label_id is not None else ""))
    return pairs


def run(args) -> int:
    """Optimize and save the token."""
    pairs = validate(args)
    from opendaam.cache import load_record
    from opendaam.models import load_pipeline, set_threads
    from opendaam.optimize import nearest_words, optimize_token

    set_threads(args.threads)
    records = [load_record(p) for _, p, _ in pairs]
    masks = [load_mask(m, args.label_id) for _, _, m in pairs]
    pipe = load_pipeline(args.model) if args.model else None
    options = {k: v for k, v in dict(loss=args.loss, lr=args.lr, epochs=args.epochs).items() if v is not None}
    token = optimize_token(records, masks, pipe=pipe, init=args.init or args.label, label=args.label,
                           method=args.method, image_ids=[i for i, _, _ in pairs], **options)
    if args.explain:
        token.meta["nearest_words"] = nearest_words(token, pipe, k=args.explain)
    path = token.save(args.out)
    last = token.history[token.meta["best_epoch"]] if token.history else {}
    print(json.dumps({"token": str(path), "loss": token.meta["loss"], "best_epoch": token.meta["best_epoch"],
                      "train_miou": last.get("train_miou"), "train_images": token.meta["train_images"],
                      "nearest_words": token.meta.get("nearest_words")}, indent=2))
    return 0
