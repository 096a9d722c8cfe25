"""The Cityscapes label definition: label ids, train ids and names, as in the benchmark's ``labels.py``.

Label ids (0..33) are what ``*_gtFine_labelIds.png`` holds; train ids (0..18, 255 = ignored in training
and evaluation) are what ``*_gtFine_labelTrainIds.png`` holds. The license plate (id -1) is left out: it
cannot be stored in a uint8 label map and Cityscapes itself maps it to "unlabeled" in label PNGs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["CITYSCAPES_COLOURS", "CITYSCAPES_IDS", "CITYSCAPES_LABELS", "IGNORE", "CityscapesLabel", "cityscapes_id",
           "label_palette", "train_id_lut"]

IGNORE = 255
"""Label value of pixels that training and evaluation skip."""


class CityscapesLabel(NamedTuple):
    """One row of the Cityscapes label table."""

    name: str
    id: int
    train_id: int
    category: str
    has_instances: bool


CITYSCAPES_LABELS: tuple[CityscapesLabel, ...] = (
    CityscapesLabel("unlabeled", 0, 255, "void", False),
    CityscapesLabel("ego vehicle", 1, 255, "void", False),
    CityscapesLabel("rectification border", 2, 255, "void", False),
    CityscapesLabel("out of roi", 3, 255, "void", False),
    CityscapesLabel("static", 4, 255, "void", False),
    CityscapesLabel("dynamic", 5, 255, "void", False),
    CityscapesLabel("ground", 6, 255, "void", False),
    CityscapesLabel("road", 7, 0, "flat", False),
    CityscapesLabel("sidewalk", 8, 1, "flat", False),
    CityscapesLabel("parking", 9, 255, "flat", False),
    CityscapesLabel("rail track", 10, 255, "flat", False),
    CityscapesLabel("building", 11, 2, "construction", False),
    CityscapesLabel("wall", 12, 3, "construction", False),
    CityscapesLabel("fence", 13, 4, "construction", False),
    CityscapesLabel("guard rail", 14, 255, "construction", False),
    CityscapesLabel("bridge", 15, 255, "construction", False),
    CityscapesLabel("tunnel", 16, 255, "construction", False),
    CityscapesLabel("pole", 17, 5, "object", False),
    CityscapesLabel("polegroup", 18, 255, "object", False),
    CityscapesLabel("traffic light", 19, 6, "object", False),
    CityscapesLabel("traffic sign", 20, 7, "object", False),
    CityscapesLabel("vegetation", 21, 8, "nature", False),
    CityscapesLabel("terrain", 22, 9, "nature", False),
    CityscapesLabel("sky", 23, 10, "sky", False),
    CityscapesLabel("person", 24, 11, "human", True),
    CityscapesLabel("rider", 25, 12, "human", True),
    CityscapesLabel("car", 26, 13, "vehicle", True),
    CityscapesLabel("truck", 27, 14, "vehicle", True),
    CityscapesLabel("bus", 28, 15, "vehicle", True),
    CityscapesLabel("caravan", 29, 255, "vehicle", True),
    CityscapesLabel("trailer", 30, 255, "vehicle", True),
    CityscapesLabel("train", 31, 16, "vehicle", True),
    CityscapesLabel("motorcycle", 32, 17, "vehicle", True),
    CityscapesLabel("bicycle", 33, 18, "vehicle", True),
)
"""Every Cityscapes label with a non-negative id, in id order."""

CITYSCAPES_IDS: dict[int, CityscapesLabel] = {label.id: label for label in CITYSCAPES_LABELS}
"""Label id -> label."""

_BY_NAME = {label.name: label for label in CITYSCAPES_LABELS}


def cityscapes_id(name: str) -> int | None:
    """The Cityscapes label id of a class name, or None when Cityscapes has no such class.

    Examples:
        >>> cityscapes_id("traffic light"), cityscapes_id("Car"), cityscapes_id("tree")
        (19, 26, None)
    """
    label = _BY_NAME.get(name.strip().lower())
    return label.id if label else None


def train_id_lut() -> np.ndarray:
    """A 256-entry lookup table from label id to train id (255 for void ids and for values >= 34).

    Examples:
        >>> lut = train_id_lut()
        >>> lut[[7, 26, 24, 25, 19, 0, 255]].tolist()
        [0, 13, 11, 12, 6, 255, 255]
    """
    lut = np.full(256, IGNORE, dtype=np.uint8)  # (256,) label id -> train id
    for label in CITYSCAPES_LABELS:
        lut[label.id] = label.train_id
    return lut


CITYSCAPES_COLOURS: dict[int, tuple[int, int, int]] = {
    0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0), 3: (0, 0, 0), 4: (0, 0, 0), 5: (111, 74, 0), 6: (81, 0, 81),
    7: (128, 64, 128), 8: (244, 35, 232), 9: (250, 170, 160), 10: (230, 150, 140), 11: (70, 70, 70),
    12: (102, 102, 156), 13: (190, 153, 153), 14: (180, 165, 180), 15: (150, 100, 100), 16: (150, 120, 90),
    17: (153, 153, 153), 18: (153, 153, 153), 19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35),
    22: (152, 251, 152), 23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142),
    27: (0, 0, 70), 28: (0, 60, 100), 29: (0, 0, 90), 30: (0, 0, 110), 31: (0, 80, 100), 32: (0, 0, 230),
    33: (119, 11, 32),
}
"""Cityscapes label id -> display colour, as in the benchmark's ``labels.py`` (``*_gtFine_color.png``)."""


def label_palette(ids: str = "label", classes: Sequence[str | dict] | None = None) -> np.ndarray:
    """A ``(256, 3)`` uint8 table from label value to Cityscapes colour (255, ignored, stays black).

    Args:
        ids: what the label values are: ``"label"`` (Cityscapes label ids, ``*_labelIds.png``) or ``"train"``
            (the 19 train ids, ``*_labelTrainIds.png``).
        classes: instead of ``ids``, the classes of values 1..K (0 is background), as in a dataset's
            ``labels/*.png``: names, or the class table's dicts (``name``, optional ``cityscapes_id``); a
            class Cityscapes lacks gets a grey of its own.

    Examples:
        >>> label_palette()[26].tolist(), label_palette("train")[13].tolist()
        ([0, 0, 142], [0, 0, 142])
        >>> label_palette(classes=["car", "tree"])[1:3].tolist()
        [[0, 0, 142], [170, 170, 170]]
    """
    table = np.zeros((256, 3), dtype=np.uint8)  # (256, 3) label value -> colour
    if classes is not None:
        for value, cls in enumerate(classes, start=1):
            label_id = _class_cityscapes_id(cls)
            grey = 96 + (37 * value) % 128  # distinct greys for classes without a Cityscapes colour
            table[value] = CITYSCAPES_COLOURS[label_id] if label_id is not None else (grey, grey, grey)
        return table
    if ids == "label":
        for label_id, colour in CITYSCAPES_COLOURS.items():
            table[label_id] = colour
    elif ids == "train":
        for label in CITYSCAPES_LABELS:
            if label.train_id != IGNORE:
                table[label.train_id] = CITYSCAPES_COLOURS[label.id]
    else:
        raise ValueError(f"ids must be 'label' (Cityscapes label ids) or 'train' (train ids), not {ids!r}")
    table[IGNORE] = (0, 0, 0)
    return table


def _class_cityscapes_id(cls: str | dict) -> int | None:
    """Cityscapes label id of a class given by name or by a class-table dict."""
    if isinstance(cls, dict):
        return cls["cityscapes_id"] if cls.get("cityscapes_id") is not None else cityscapes_id(cls["name"])
    return cityscapes_id(cls)
