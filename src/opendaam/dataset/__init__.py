"""Synthetic segmentation datasets: spec, generation, labels, filters, exports, resume and sharding.

Example:
    >>> from opendaam.dataset import parse_spec, expand_items
    >>> spec = parse_spec({"classes": [{"name": "car", "prompts": ["a {} on a street"]}], "seeds": [0, 1]})
    >>> len(expand_items(spec))
    2
"""

from opendaam.dataset.cityscapes import CITYSCAPES_LABELS, cityscapes_id, train_id_lut
from opendaam.dataset.export import export_cityscapes, export_coco
from opendaam.dataset.generate import GenerateResult, Shard, current_shard, generate
from opendaam.dataset.io import DatasetError, WriteError, read_manifest, read_npz
from opendaam.dataset.labels import connected_components, label_map
from opendaam.dataset.merge import filter_items, finalize, load_dataset
from opendaam.dataset.spec import DatasetSpec, SpecError, expand_items, load_spec, parse_spec, spec_hash

__all__ = [
    "CITYSCAPES_LABELS",
    "DatasetError",
    "DatasetSpec",
    "GenerateResult",
    "Shard",
    "SpecError",
    "WriteError",
    "cityscapes_id",
    "connected_components",
    "current_shard",
    "expand_items",
    "export_cityscapes",
    "export_coco",
    "filter_items",
    "finalize",
    "generate",
    "label_map",
    "load_dataset",
    "load_spec",
    "parse_spec",
    "read_manifest",
    "read_npz",
    "spec_hash",
    "train_id_lut",
]
