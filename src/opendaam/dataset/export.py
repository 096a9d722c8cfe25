"""Exports that segmentation trainers read: the Cityscapes folder layout, COCO instance JSON and a
Hugging Face ``datasets`` folder (parquet).

Both are written from a finished dataset's label maps (0 background, 1..K classes, 255 ignore) and
only for the items the filters kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from opendaam.dataset.cityscapes import CITYSCAPES_IDS, IGNORE, label_palette, train_id_lut
from opendaam.dataset.io import atomic_write, inside, png_bytes
from opendaam.dataset.labels import connected_components

__all__ = [
    "cityscapes_arrays", "coco_annotations", "export_cityscapes", "export_coco", "export_huggingface", "safe_city",
]


def safe_city(name: str) -> str:
    """A Cityscapes "city" name from a dataset name (letters, digits, dashes; no underscores, which
    Cityscapes uses as separators).

    Examples:
        >>> safe_city("Thesis urban_v1")
        'thesis-urban-v1'
    """
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "opendaam"


def class_to_label_ids(classes: Sequence[dict], background_id: int = 0) -> np.ndarray:
    """A 256-entry table from dataset label (0 background, 1..K, 255 ignore) to Cityscapes label id.

    Classes without a Cityscapes id and ignored pixels become 0 ("unlabeled"), which trainers ignore.

    Examples:
        >>> lut = class_to_label_ids([{"id": 1, "cityscapes_id": 26}, {"id": 2, "cityscapes_id": None}])
        >>> lut[[0, 1, 2, 255]].tolist()
        [0, 26, 0, 0]
    """
    lut = np.zeros(256, dtype=np.uint8)  # (256,) dataset label -> Cityscapes label id
    lut[0] = background_id
    for cls in classes:
        if cls.get("cityscapes_id") is not None:
            lut[cls["id"]] = cls["cityscapes_id"]
    lut[IGNORE] = 0
    return lut


_LABEL_COLOURS = label_palette("label")  # palette PNGs: the ids stay, viewers see Cityscapes' colours
_TRAIN_COLOURS = label_palette("train")


def cityscapes_arrays(labels: np.ndarray, classes: Sequence[dict],
                      background_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Cityscapes ``labelIds`` and ``labelTrainIds`` maps of a dataset label map.

    Ignored pixels (255) are "unlabeled" (id 0) and train id 255, whatever the background is.

    Examples:
        >>> classes = [{"id": 1, "cityscapes_id": 26}, {"id": 2, "cityscapes_id": 24}]
        >>> ids, train = cityscapes_arrays(np.array([[0, 1, 2, 255]], np.uint8), classes, background_id=7)
        >>> ids.tolist(), train.tolist()
        ([[7, 26, 24, 0]], [[0, 13, 11, 255]])
    """
    label_ids = class_to_label_ids(classes, background_id)[labels]  # (H, W) uint8
    train_ids = train_id_lut()[label_ids]  # (H, W) uint8
    train_ids[labels == IGNORE] = IGNORE
    return label_ids, train_ids


def export_cityscapes(out: Path, entries: Sequence[dict], classes: Sequence[dict], *, city: str, split: str = "train",
                      background_id: int = 0, dest: Path | None = None) -> list[Path]:
    """Write ``cityscapes/leftImg8bit/<split>/<city>/`` and ``cityscapes/gtFine/<split>/<city>/``.

    File names follow Cityscapes: ``<city>_<index:06d>_000019_leftImg8bit.png``,
    ``..._gtFine_labelIds.png`` (official label ids), ``..._gtFine_color.png`` (their colours, RGBA, as the
    benchmark ships them) and ``..._gtFine_labelTrainIds.png`` (19 train ids,
    255 ignore). Item files are read from ``out``; the export is written under ``dest`` (default ``out``).
    Returns the written paths.

    Raises:
        opendaam.dataset.io.DatasetError: a file would land outside ``dest`` (``split`` or ``city`` with
            ``..`` or ``/``), or an item file lies outside ``out``.
    """
    if background_id not in CITYSCAPES_IDS:
        raise ValueError(f"background_id {background_id} is not a Cityscapes label id")
    dest = out if dest is None else dest
    root = dest / "cityscapes"
    written = []
    for entry in entries:
        stem = f"{city}_{int(entry['index']):06d}_000019"
        labels = np.asarray(Image.open(inside(out, entry["files"]["label"])))
        label_ids, train_ids = cityscapes_arrays(labels, classes, background_id)
        image = inside(root, f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png")
        gt = inside(root, f"gtFine/{split}/{city}")
        written.append(atomic_write(image, inside(out, entry["files"]["image"]).read_bytes()))
        written.append(atomic_write(inside(gt, f"{stem}_gtFine_labelIds.png"), png_bytes(label_ids, _LABEL_COLOURS)))
        written.append(atomic_write(inside(gt, f"{stem}_gtFine_labelTrainIds.png"), png_bytes(train_ids,
                                                                                             _TRAIN_COLOURS)))
        colour = np.concatenate([_LABEL_COLOURS[label_ids], np.full((*label_ids.shape, 1), 255, np.uint8)], -1)
        written.append(atomic_write(inside(gt, f"{stem}_gtFine_color.png"), png_bytes(colour)))  # (H, W, 4) RGBA
    return written


def coco_annotations(labels: np.ndarray, classes: Sequence[dict], image_id: int, first_id: int = 1) -> list[dict]:
    """COCO instance annotations of a label map: one per connected component (8-connected) of each class.

    Segmentations are RLE (pycocotools), with ``counts`` as a string; ignored and background pixels
    belong to no annotation.

    Examples:
        >>> anns = coco_annotations(np.array([[1, 0, 1], [1, 0, 0]], np.uint8), [{"id": 1, "name": "car"}], 7)
        >>> [(a["id"], a["image_id"], a["category_id"], a["area"], a["bbox"]) for a in anns]
        [(1, 7, 1, 2, [0.0, 0.0, 1.0, 2.0]), (2, 7, 1, 1, [2.0, 0.0, 1.0, 1.0])]
    """
    from pycocotools import mask as mask_utils

    annotations = []
    for cls in classes:
        components, count = connected_components(labels == cls["id"], connectivity=8)  # (H, W) int32
        for component in range(1, count + 1):
            binary = np.asfortranarray((components == component).astype(np.uint8))  # (H, W), Fortran order for RLE
            rle = mask_utils.encode(binary)
            annotations.append({
                "id": first_id + len(annotations), "image_id": image_id, "category_id": int(cls["id"]),
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            })
    return annotations


def export_coco(out: Path, entries: Sequence[dict], classes: Sequence[dict], *, split: str = "train",
                info: dict | None = None, dest: Path | None = None) -> Path:
    """Write ``coco/instances_<split>.json`` (under ``dest``, default ``out``): images (``file_name``
    relative to ``images/``), instance annotations from connected components, categories with the dataset's
    label ids.

    Image ids are the item index + 1 (COCO tools treat 0 as "no image").

    Raises:
        opendaam.dataset.io.DatasetError: the file would land outside ``dest`` (a ``split`` with ``/``).
    """
    dest = out if dest is None else dest
    target = inside(dest / "coco", f"instances_{split}.json")
    images, annotations = [], []
    for entry in entries:
        labels = np.asarray(Image.open(inside(out, entry["files"]["label"])))
        image_id = int(entry["index"]) + 1
        images.append({"id": image_id, "file_name": Path(entry["files"]["image"]).name, "height": labels.shape[0],
                       "width": labels.shape[1], "prompt": entry["prompt"], "seed": entry["seed"]})
        annotations += coco_annotations(labels, classes, image_id, first_id=len(annotations) + 1)
    categories = []
    for cls in classes:
        cs = cls.get("cityscapes_id")
        supercategory = CITYSCAPES_IDS[cs].category if cs is not None else "object"
        categories.append({"id": int(cls["id"]), "name": cls["name"], "supercategory": supercategory})
    data = {"info": info or {}, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}
    return atomic_write(target, json.dumps(data, separators=(",", ":")) + "\n")


def export_huggingface(out: Path, entries: Sequence[dict], classes: Sequence[dict], *, split: str = "train",
                       name: str = "opendaam", dest: Path | None = None) -> list[Path]:
    """Write ``huggingface/``: one parquet file with columns ``image`` and ``label`` (``datasets.Image``),
    ``prompt``, ``seed``, ``index``, plus ``id2label.json`` and a card whose YAML header names the split,
    so ``datasets.load_dataset(str(out / "huggingface"))`` loads it and ``push_to_hub`` publishes it.

    ``label`` is the dataset's label map (0 background, class ids, 255 ignore), the layout Hugging Face
    semantic-segmentation trainers (SegFormer, Mask2Former) read with ``id2label``.

    The card's config is named after the dataset and the parquet file's SHA-256 (``<name>-<hash12>``), so
    ``datasets`` caches every export under its own name: two exports loaded one after the other each give
    their own rows.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("the huggingface export needs the datasets package: pip install 'opendaam[huggingface]' "
                          "(or remove 'huggingface' from outputs.formats)") from error
    import hashlib
    import io

    features = datasets.Features({
        "image": datasets.Image(), "label": datasets.Image(), "prompt": datasets.Value("string"),
        "seed": datasets.Value("int64"), "index": datasets.Value("int64"),
    })
    rows = {
        "image": [{"bytes": inside(out, e["files"]["image"]).read_bytes(), "path": None} for e in entries],
        "label": [{"bytes": inside(out, e["files"]["label"]).read_bytes(), "path": None} for e in entries],
        "prompt": [e["prompt"] for e in entries],
        "seed": [int(e["seed"]) for e in entries],
        "index": [int(e["index"]) for e in entries],
    }
    table = datasets.Dataset.from_dict(rows, features=features)
    buffer = io.BytesIO()
    table.to_parquet(buffer)
    root = (out if dest is None else dest) / "huggingface"
    parquet = inside(root / "data", f"{split}-00000-of-00001.parquet")
    config = f"{safe_city(name)}-{hashlib.sha256(buffer.getvalue()).hexdigest()[:12]}"
    id2label = {"0": "background", **{str(c["id"]): c["name"] for c in classes}}
    card = "\n".join([
        "---",
        "configs:",
        f"- config_name: {config}",
        "  default: true",
        "  data_files:",
        f"  - split: {split}",
        f"    path: data/{split}-*.parquet",
        "task_categories:",
        "- image-segmentation",
        "tags:",
        "- synthetic",
        "- opendaam",
        "---",
        "",
        f"# {name}",
        "",
        "Synthetic semantic segmentation data made with opendaam (see the dataset folder's README.md).",
        "`label` holds 0 for background, the class ids of `id2label.json`, and 255 for ignored pixels.",
        "",
    ])
    return [
        atomic_write(parquet, buffer.getvalue()),
        atomic_write(root / "id2label.json", json.dumps(id2label, indent=2) + "\n"),
        atomic_write(root / "README.md", card),
    ]
