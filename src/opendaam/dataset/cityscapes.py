"""The Cityscapes label definition: label ids, train ids and names, as in the benchmark's ``labels.py``.

Label ids (0..33) are what ``*_gtFine_labelIds.png`` holds; train ids (0..18, 255 = ignored in training
and evaluation) are what ``*_gtFine_labelTrainIds.png`` holds. The license plate (id -1) is left out: it
cannot be stored in a uint8 label map and Cityscapes itself maps it to "unlabeled" in label PNGs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["CITYSCAPES_IDS", "CITYSCAPES_LABELS", "IGNORE", "CityscapesLabel", "cityscapes_id", "train_id_lut"]

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

    Example:
        >>> cityscapes_id("traffic light"), cityscapes_id("Car"), cityscapes_id("tree")
        (19, 26, None)
    """
    label = _BY_NAME.get(name.strip().lower())
    return label.id if label else None


def train_id_lut() -> np.ndarray:
    """A 256-entry lookup table from label id to train id (255 for void ids and for values >= 34).

    Example:
        >>> lut = train_id_lut()
        >>> lut[[7, 26, 24, 25, 19, 0, 255]].tolist()
        [0, 13, 11, 12, 6, 255, 255]
    """
    lut = np.full(256, IGNORE, dtype=np.uint8)  # (256,) label id -> train id
    for label in CITYSCAPES_LABELS:
        lut[label.id] = label.train_id
    return lut
