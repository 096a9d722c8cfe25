"""Dataset specs, label tables, label maps, instances, filters and crash-safe writing (no generation)."""

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from opendaam.dataset.cityscapes import CITYSCAPES_LABELS, cityscapes_id, train_id_lut
from opendaam.dataset.export import cityscapes_arrays, coco_annotations
from opendaam.dataset.io import WriteError, append_line, atomic_write, npz_bytes, read_manifest, read_npz
from opendaam.dataset.labels import connected_components, label_map
from opendaam.dataset.merge import filter_items
from opendaam.dataset.spec import FilterSpec, SpecError, expand_items, load_spec, parse_spec, spec_hash

EXAMPLES = Path(__file__).resolve().parents[1] / "src" / "opendaam" / "examples"
BASE = {"classes": [{"name": "car", "prompts": ["a {} on a street"]}]}


def test_example_specs_validate():
    thesis = load_spec(EXAMPLES / "thesis_toy_urban.yaml")
    assert thesis.model_spec.id == "toy-urban"
    assert thesis.class_names == ["car", "person", "traffic light", "rider"]
    items = expand_items(thesis)
    assert len(items) == 200
    assert [it.classes for it in items[::50]] == [("car",), ("person",), ("traffic light",), ("rider",)]
    assert items[100].prompt == "a traffic light in an urban environment" and items[101].seed == 1
    sd2 = load_spec(EXAMPLES / "thesis_sd2_base.yaml")
    assert sd2.model_spec.id == "stabilityai/stable-diffusion-2-base" and (sd2.height, sd2.width) == (512, 512)
    assert [it.prompt for it in expand_items(sd2)] == [it.prompt for it in items]
    multi = load_spec(EXAMPLES / "urban_multiclass.yaml")
    prompts = {it.prompt: it.classes for it in expand_items(multi)}
    assert prompts["a rider passing a car and a tree in the city"] == ("car", "rider", "tree")


@pytest.mark.parametrize("data, message", [
    ({**BASE, "stepz": 3}, "unknown spec key 'stepz'; allowed keys here: classes, name, model"),
    ({**BASE, "steps": "ten"}, "spec key 'steps': expected an integer or null, got a string 'ten'"),
    ({**BASE, "guidance": [1]}, "spec key 'guidance': expected a number or null, got a list [1]"),
    ({"classes": [{"name": "car", "prompts": "a {}"}]},
     "spec key 'classes[0].prompts': expected a list of strings, got a string 'a {}'"),
    ({"classes": [{"name": "car", "prompt": ["a {}"]}]}, "unknown spec key 'classes[0].prompt'"),
    ({**BASE, "seeds": {"start": 0, "cnt": 3}}, "unknown spec key 'seeds.cnt'; allowed keys here: start, count"),
    ({**BASE, "seeds": "0-9"}, "spec key 'seeds': expected a list of integers or a mapping with keys start, count"),
    ({**BASE, "method": "gradcam"}, "spec key 'method': expected one of 'daam', 'open_vocab', 'linear'"),
    ({**BASE, "model": {"id": "x", "rev": "main"}}, "unknown spec key 'model.rev'; allowed keys here: id, revision"),
    ({**BASE, "thresholds": {"low": 0.6, "high": 0.4}}, "expected 0 <= low <= high <= 1, got low=0.6, high=0.4"),
    ({**BASE, "outputs": {"formats": ["voc"]}},
     "spec key 'outputs.formats[0]': expected one of 'cityscapes', 'coco', 'huggingface'"),
    ({"classes": [{"name": "car"}]}, "class 'car' has no prompt"),
    ({**BASE, "classes": [{"name": "car", "prompts": ["a {} on a street"]}, {"name": "bus"}]},
     "class 'bus' has no prompt"),
    ({"classes": [{"name": "car", "prompts": ["a {truck}"]}]}, "names unknown class 'truck'; classes: car"),
    ({"classes": [{"name": "car", "prompts": ["a street"]}]}, "does not name its class"),
    ({"classes": [{"name": "car", "prompts": ["a {} {"]}]}, "unbalanced brace"),
    ({"classes": [{"name": "car", "prompts": ["a {}"], "token": "car.safetensors"}]}, "DAAM cannot map it"),
    ({"classes": []}, "expected at least one class"),
    ({}, "spec key 'classes' is required"),
    ({**BASE, "seeds": [1, 1]}, "seeds repeat"),
    ({"classes": [{"name": "car", "prompts": ["a {}"], "cityscapes_id": 99}]}, "99 is not a Cityscapes label id"),
])
def test_bad_specs_name_key_and_expected_type(data, message):
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    assert message in str(info.value)


def test_spec_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("classes:\n  - name: car\n    prompts: ['a {}']\nsteps: many\n")
    with pytest.raises(SpecError, match=r"bad.yaml: spec key 'steps': expected an integer"):
        load_spec(path)
    path.write_text("classes: [\n")
    with pytest.raises(SpecError, match="is not valid YAML"):
        load_spec(path)
    with pytest.raises(FileNotFoundError, match="no dataset spec"):
        load_spec(tmp_path / "missing.yaml")


def test_toml_spec_and_templates(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('seeds = {start = 5, count = 2}\nprompts = ["a {car} and a {{literal}} {tl}"]\n'
                    '[[classes]]\nname = "car"\ntext = "red car"\n[[classes]]\nname = "tl"\ntext = "traffic light"\n')
    spec = load_spec(path)
    items = expand_items(spec)
    assert [(it.prompt, it.seed, it.classes) for it in items] == [
        ("a red car and a {literal} traffic light", 5, ("car", "tl")),
        ("a red car and a {literal} traffic light", 6, ("car", "tl")),
    ]


def test_spec_hash_tracks_generation_and_token_content(tmp_path):
    a = parse_spec({**BASE, "steps": 2})
    assert spec_hash(a) == spec_hash(parse_spec({**BASE, "steps": 2, "filter": {"min_confidence": 0.5},
                                                 "outputs": {"formats": ["coco"]}, "name": "other"}))
    assert spec_hash(a) != spec_hash(parse_spec({**BASE, "steps": 3}))
    token = tmp_path / "car.safetensors"
    token.write_bytes(b"one")
    data = {"method": "linear", "classes": [{"name": "car", "prompts": ["a {}"], "token": "car.safetensors"}]}
    first = spec_hash(parse_spec(data, base_dir=tmp_path))
    token.write_bytes(b"two")
    assert spec_hash(parse_spec(data, base_dir=tmp_path)) != first


def test_cityscapes_ids_and_train_ids():
    lut = train_id_lut()
    assert {name: (cityscapes_id(name), int(lut[cityscapes_id(name)])) for name in
            ("road", "car", "person", "rider", "traffic light", "sky", "bicycle")} == {
        "road": (7, 0), "car": (26, 13), "person": (24, 11), "rider": (25, 12), "traffic light": (19, 6),
        "sky": (23, 10), "bicycle": (33, 18)}
    train = sorted(label.train_id for label in CITYSCAPES_LABELS if label.train_id != 255)
    assert train == list(range(19))  # the 19 evaluation classes, each once
    assert [label.id for label in CITYSCAPES_LABELS] == list(range(34))
    assert lut[0] == lut[4] == lut[9] == lut[29] == 255  # unlabeled, static, parking, caravan: ignored


def test_label_map_matches_a_per_pixel_rule():
    rng = np.random.default_rng(0)
    scores = rng.random((3, 9, 11)).astype(np.float32)
    ids = [1, 4, 2]
    labels = label_map(scores, ids, low=0.4, high=0.7)
    for y in range(9):
        for x in range(11):
            values = [float(scores[k, y, x]) for k in range(3)]
            best = max(values)
            expected = 0 if best < 0.4 else (ids[values.index(best)] if best >= 0.7 else 255)
            assert labels[y, x] == expected


def _flood_fill_components(mask: np.ndarray, connectivity: int) -> tuple[np.ndarray, int]:
    """Components by breadth-first flood fill from each unlabelled pixel in raster order (an independent oracle)."""
    from collections import deque

    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    out = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    for y, x in zip(*np.nonzero(mask), strict=True):
        if out[y, x]:
            continue
        count += 1
        out[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not out[ny, nx]:
                    out[ny, nx] = count
                    queue.append((ny, nx))
    return out, count


def test_connected_components_match_a_flood_fill():
    rng = np.random.default_rng(1)
    for _ in range(50):
        mask = rng.random((int(rng.integers(1, 25)), int(rng.integers(1, 25)))) < rng.random()
        for connectivity in (8, 4):
            ours, n = connected_components(mask, connectivity)
            theirs, m = _flood_fill_components(mask, connectivity)
            assert n == m and np.array_equal(ours, theirs) and ours.dtype == np.int32


def test_coco_masks_decode_to_label_map():
    from pycocotools import mask as mask_utils

    labels = np.zeros((20, 24), np.uint8)
    labels[2:6, 2:8] = 1
    labels[10:15, 3:5] = 1  # a second car instance
    labels[8:18, 12:20] = 2
    labels[9:11, 13:15] = 255  # ignore inside the person
    classes = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    anns = coco_annotations(labels, classes, image_id=3)
    assert [(a["category_id"], a["area"]) for a in anns] == [(1, 24), (1, 10), (2, 76)]
    painted = np.zeros_like(labels)
    for ann in anns:
        rle = {"size": ann["segmentation"]["size"], "counts": ann["segmentation"]["counts"].encode()}
        painted[mask_utils.decode(rle).astype(bool)] = ann["category_id"]
    assert np.array_equal(painted, np.where(labels == 255, 0, labels))
    assert anns[2]["bbox"] == [12.0, 8.0, 8.0, 10.0]


def test_cityscapes_arrays_use_official_ids():
    labels = np.array([[0, 1, 2, 3, 255]], np.uint8)
    classes = [{"id": 1, "cityscapes_id": 26}, {"id": 2, "cityscapes_id": 25}, {"id": 3, "cityscapes_id": None}]
    ids, train = cityscapes_arrays(labels, classes)
    assert ids.tolist() == [[0, 26, 25, 0, 0]] and train.tolist() == [[255, 13, 12, 255, 255]]


def test_filter_percentiles_and_confidence():
    areas = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.9]
    entries = [{"index": i, "masks": [{"class": "car", "area": a, "confidence": 0.9 if i != 3 else 0.2}]}
               for i, a in enumerate(areas)]
    entries.append({"index": 8, "masks": [{"class": "person", "area": 0.5, "confidence": 0.9}]})
    low, high = np.percentile(areas, [10, 90])
    dropped = filter_items(entries, FilterSpec(area_percentiles=(10, 90), min_confidence=0.5))
    assert sorted(dropped) == sorted([i for i, a in enumerate(areas) if not low <= a <= high] + [3])
    assert dropped[3] == ["car confidence 0.2000 below 0.5"]
    assert dropped[0] == [f"car area 0.0000 below the 10th percentile {low:.4f}"]
    assert filter_items(entries, FilterSpec()) == {}


def test_manifest_drops_torn_last_line_only(tmp_path):
    path = tmp_path / "m.jsonl"
    append_line(path, {"index": 0})
    append_line(path, {"index": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"index": 2, "fi')  # a writer killed mid-line
    assert read_manifest(path) == [{"index": 0}, {"index": 1}]
    path.write_text('{"index": 0}\nnot json\n{"index": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_manifest(path)


@pytest.mark.parametrize("code, hint", [(errno.EACCES, "check that you may write"), (errno.ENOSPC, "free some space")])
def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch, code, hint):
    path = atomic_write(tmp_path / "x.png", b"old")

    def fail(src, dst):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(WriteError, match=f"cannot write {path}: {os.strerror(code)}; {hint}"):
        atomic_write(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.png"]


def test_atomic_writes_get_the_permissions_of_a_plain_write(tmp_path):
    from opendaam._io import atomic_write_with

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() gives under this process's umask
    atomic = atomic_write(tmp_path / "a.json", "x")
    record = atomic_write_with(tmp_path / "r.safetensors", lambda p: p.write_bytes(b"x"))
    modes = {p.name: p.stat().st_mode & 0o777 for p in (plain, atomic, record)}
    assert modes == dict.fromkeys(modes, plain.stat().st_mode & 0o777), modes


def test_atomic_write_temp_files_are_the_ones_remove_temp_files_clears(tmp_path, monkeypatch):
    from opendaam.dataset.io import remove_temp_files

    seen, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: seen.append(Path(src)) or replace(src, dst))
    atomic_write(tmp_path / "x.png", b"png")
    (tmp := seen[0]).write_bytes(b"left by a killed writer")  # recreate what kill -9 would leave
    assert tmp.parent == tmp_path and tmp.name.startswith(".x.png.")
    assert remove_temp_files(tmp_path) == 1 and os.listdir(tmp_path) == ["x.png"]


def test_npz_is_reproducible_and_loads_without_pickle():
    arrays = {"car": np.linspace(0, 1, 12, dtype=np.float16).reshape(3, 4), "traffic light": np.zeros((3, 4))}
    data = npz_bytes(arrays)
    assert data == npz_bytes(arrays)
    loaded = read_npz(data)
    assert list(loaded) == ["car", "traffic light"] and np.array_equal(loaded["car"], arrays["car"])
    assert json.loads(json.dumps(loaded["car"].shape)) == [3, 4]


def test_shard_from_environment(monkeypatch):
    from opendaam.dataset import Shard, current_shard
    from opendaam.dataset.spec import Item

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert current_shard() == Shard(2, 3)
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert current_shard() == Shard(0, 1)
    items = [Item(i, "p", "p", 0, ()) for i in range(10)]
    taken = [[it.index for it in Shard(r, 3).take(items)] for r in range(3)]
    assert sorted(sum(taken, [])) == list(range(10)) and taken[1] == [1, 4, 7]
    with pytest.raises(ValueError, match="bad shard: process 3 of 3"):
        current_shard(3, 3)
