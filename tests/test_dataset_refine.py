"""Datasets with self-attention refinement and adaptive thresholds: the stored maps equal refine() of the same
generation traced by hand, the labels equal adaptive_label_map of the stored maps, and a spec naming
refinement layers the model does not have is refused before anything is written."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from opendaam.dataset import generate, load_spec, read_npz
from opendaam.dataset.labels import adaptive_label_map
from opendaam.dataset.spec import SpecError
from opendaam.heatmaps import heatmaps
from opendaam.models import build_pipeline, load_pipeline
from opendaam.refine import refine
from opendaam.tracing import trace

SPEC = """\
name: refined
model: tiny
steps: 2
height: 32
width: 32
seeds: [3]
thresholds: {{mode: adaptive, margin: 0.2, min_gap: 0.05}}
refine: {{layers: [{layers}], power: 2}}
classes:
  - name: car
    prompts: ["a {{}} in an urban environment"]
outputs: {{formats: [cityscapes]}}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("refined")
    build_pipeline("tiny", seed=0).save_pretrained(root / "tiny")
    return root


def test_refined_adaptive_dataset(root):
    (root / "spec.yaml").write_text(SPEC.format(layers="up_blocks.1"))
    result = generate(load_spec(root / "spec.yaml"), root / "out", threads=1, progress=False)
    assert result.kept == 1
    entry = json.loads((root / "out" / "manifest.jsonl").read_text().splitlines()[0])
    scores = read_npz(root / "out" / entry["files"]["maps"])["car"].astype(np.float32)  # (H, W)
    labels = np.array(Image.open(root / "out" / entry["files"]["label"]))
    assert np.array_equal(labels, adaptive_label_map(scores[None], [1], 0.2, 0.05))
    picture = Image.open(root / "out" / entry["files"]["label"])  # palette PNG: ids kept, colours shown
    assert picture.mode == "P" and picture.getpalette()[3:6] == [0, 0, 142]  # value 1 (car): Cityscapes' car
    exported = sorted((root / "out" / "cityscapes").rglob("*_gtFine_labelIds.png"))
    assert exported and Image.open(exported[0]).mode == "P"
    assert Image.open(exported[0]).getpalette()[26 * 3 : 26 * 3 + 3] == [0, 0, 142]  # label id 26 is car
    ids = np.array(Image.open(exported[0]))
    colour = np.array(Image.open(str(exported[0]).replace("_labelIds", "_color")))  # (H, W, 4) RGBA
    assert colour.shape == (*ids.shape, 4) and (colour[..., 3] == 255).all()
    assert (colour[ids == 26][:, :3] == [0, 0, 142]).all() and (ids == 26).any()
    pipe = load_pipeline(root / "tiny")
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, self_attention=("up_blocks.1",)) as tracer:
        pipe("a car in an urban environment", generator=torch.Generator().manual_seed(3), num_inference_steps=2,
             height=32, width=32, output_type="np")
    record = tracer.records[0]
    by_hand = refine(record, heatmaps(record, "car"), power=2).normalized()[0].clamp(0, 1)
    assert np.allclose(scores, by_hand.numpy(), atol=2e-3)  # float16 storage


def test_unknown_refinement_layers_refused_before_writing(root):
    (root / "bad.yaml").write_text(SPEC.format(layers="up_blocks.7"))
    with pytest.raises(SpecError, match="refine.layers.*unknown layer 'up_blocks.7'.*the model's self-attention"):
        generate(load_spec(root / "bad.yaml"), root / "bad", threads=1, progress=False)
    assert not (root / "bad").exists() or not any((root / "bad").iterdir())
    (root / "zero.yaml").write_text(SPEC.format(layers="up_blocks.1").replace("power: 2", "power: 0"))
    with pytest.raises(SpecError, match="spec key 'refine': give layers"):
        load_spec(root / "zero.yaml")
