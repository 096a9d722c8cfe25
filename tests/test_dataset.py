"""Dataset generation on a tiny pipeline saved to a folder: files, determinism, exports, resume after
SIGKILL, sharding, refusing another spec's folder, write errors."""

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opendaam.cli import dataset as dataset_cli
from opendaam.dataset import DatasetError, WriteError, generate, load_spec, read_npz
from opendaam.dataset.labels import label_map
from opendaam.models import build_pipeline

SPEC = """\
name: tiny-urban
model: {model}
steps: 2
height: 32
width: 32
seeds: {{start: 0, count: {count}}}
thresholds: {{low: 0.55, high: 0.75}}
classes:
  - name: car
    prompts: ["a {{}} in an urban environment"]
  - name: person
    prompts: ["a {{}} on a street"]
  - name: tree
prompts:
  - "a {{car}} and a {{person}} next to a {{tree}}"
filter: {{area_percentiles: [10, 100]}}
"""

CLI = ("import argparse, sys\nfrom opendaam.cli import dataset\np = argparse.ArgumentParser()\n"
       "dataset.add_parser(p.add_subparsers())\na = p.parse_args(sys.argv[1:])\nsys.exit(a.run(a))\n")


def cli(*argv: str) -> int:
    """Run ``opendaam dataset ...`` in this process (the parser is built here: no registration needed)."""
    parser = argparse.ArgumentParser()
    dataset_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["dataset", *argv])
    return args.run(args)


def cli_process(*argv: str, env: dict | None = None) -> subprocess.Popen:
    """``opendaam dataset ...`` in a subprocess."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", CLI, "dataset", *argv], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset")
    build_pipeline("tiny", seed=0).save_pretrained(root / "tiny")
    (root / "spec.yaml").write_text(SPEC.format(model="tiny", count=4))  # model path relative to the spec
    assert cli("generate", str(root / "spec.yaml"), "--out", str(root / "ref"), "--threads", "1",
               "--no-progress") == 0
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file of a dataset except the shard manifests, by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "shards" not in p.parts}


def without_timing(data: bytes) -> list[dict]:
    entries = [json.loads(line) for line in data.decode().splitlines()]
    for entry in entries:
        assert set(entry["timing"]) == {"generate_s", "label_s", "write_s"}
        del entry["timing"]
    return entries


def assert_same_dataset(a: Path, b: Path) -> None:
    """Byte-identical files (labels, images, maps, exports, card); manifests equal except timing fields."""
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "manifest.jsonl":
            assert without_timing(fa[name]) == without_timing(fb[name])
        else:
            assert fa[name] == fb[name], name


def test_items_files_and_manifest(setup):
    ref = setup / "ref"
    spec = load_spec(setup / "spec.yaml")
    entries = [json.loads(line) for line in (ref / "manifest.jsonl").read_text().splitlines()]
    assert [e["index"] for e in entries] == list(range(12))
    assert entries[8]["prompt"] == "a car and a person next to a tree" and entries[8]["classes"] == ["car", "person",
                                                                                                     "tree"]
    assert entries[5]["seed"] == 1 and entries[5]["template"] == "a {} on a street"
    ids = {"car": 1, "person": 2, "tree": 3}
    for entry in entries:
        labels = np.asarray(Image.open(ref / entry["files"]["label"]))
        assert labels.shape == (32, 32) and labels.dtype == np.uint8
        maps = read_npz(ref / entry["files"]["maps"])
        assert list(maps) == entry["classes"] and all(m.shape == (32, 32) and m.dtype == np.float16
                                                      for m in maps.values())
        scores = np.stack([maps[c] for c in entry["classes"]]).astype(np.float32)
        assert np.isclose(scores.max(axis=(1, 2)), 1.0, atol=1e-3).all()  # max-normalized DAAM maps
        expected = label_map(scores, [ids[c] for c in entry["classes"]], 0.55, 0.75)  # recomputed from the maps
        assert np.array_equal(labels, expected)
        for mask in entry["masks"]:
            inside = labels == mask["id"]
            assert mask["pixels"] == int(inside.sum())
            assert np.isclose(mask["confidence"], scores[entry["classes"].index(mask["class"])][inside].mean()
                              if inside.any() else 0.0, atol=1e-5)
        assert np.isclose(entry["ignored"], (labels == 255).mean(), atol=1e-6)
        image = Image.open(ref / entry["files"]["image"])
        assert image.size == (32, 32) and image.mode == "RGB"
        prov = entry["provenance"]
        assert prov["model"] == "tiny" and prov["steps"] == 2 and prov["spec_hash"] == json.loads(
            (ref / "dataset.json").read_text())["spec_hash"]
        assert prov["opendaam"] == "0.1.0" and prov["method"] == "daam"
    assert any((np.asarray(Image.open(ref / e["files"]["label"])) == 255).any() for e in entries)  # band used
    dropped = [json.loads(line) for line in (ref / "dropped.jsonl").read_text().splitlines()]
    card = (ref / "README.md").read_text()
    assert "- items: 12 (3 prompt templates x 4 seeds)" in card
    assert f"- kept by the filters: {12 - len(dropped)}; dropped: {len(dropped)}" in card
    assert "| 1 | car | 26 | 8 |" in card and "| 3 | tree | - | 4 |" in card
    assert (ref / "spec.yaml").read_text() == (setup / "spec.yaml").read_text()
    assert spec.class_names == ["car", "person", "tree"]


def test_filter_drops_small_masks_with_reasons(setup):
    entries = [json.loads(line) for line in (setup / "ref" / "manifest.jsonl").read_text().splitlines()]
    dropped = {d["index"]: d["reasons"] for d in map(json.loads, (setup / "ref" / "dropped.jsonl").read_text()
                                                        .splitlines())}
    for cls in ("car", "person", "tree"):
        areas = [m["area"] for e in entries for m in e["masks"] if m["class"] == cls]
        low = np.percentile(areas, 10)
        for e in entries:
            for m in e["masks"]:
                if m["class"] == cls and m["area"] < low:
                    assert f"{cls} area {m['area']:.4f} below the 10th percentile {low:.4f}" in dropped[e["index"]]
    assert dropped, "10th percentile filter dropped nothing"


def test_exports_cityscapes_and_coco(setup):
    from pycocotools.coco import COCO

    ref = setup / "ref"
    entries = [json.loads(line) for line in (ref / "manifest.jsonl").read_text().splitlines()]
    dropped = {json.loads(line)["index"] for line in (ref / "dropped.jsonl").read_text().splitlines()}
    kept = [e for e in entries if e["index"] not in dropped]
    gt = ref / "cityscapes" / "gtFine" / "train" / "tiny-urban"
    assert len(list(gt.glob("*_gtFine_labelIds.png"))) == len(kept)
    for entry in kept:
        labels = np.asarray(Image.open(ref / entry["files"]["label"]))
        stem = f"tiny-urban_{entry['index']:06d}_000019"
        ids = np.asarray(Image.open(gt / f"{stem}_gtFine_labelIds.png"))
        train = np.asarray(Image.open(gt / f"{stem}_gtFine_labelTrainIds.png"))
        official = {0: 0, 1: 26, 2: 24, 3: 0, 255: 0}  # tree is not a Cityscapes class: unlabeled
        train_of = {0: 255, 1: 13, 2: 11, 3: 255, 255: 255}
        assert np.array_equal(ids, np.vectorize(official.get)(labels))
        assert np.array_equal(train, np.vectorize(train_of.get)(labels))
        left = ref / "cityscapes" / "leftImg8bit" / "train" / "tiny-urban" / f"{stem}_leftImg8bit.png"
        assert left.read_bytes() == (ref / entry["files"]["image"]).read_bytes()
    coco = COCO(str(ref / "coco" / "instances_train.json"))
    assert sorted(coco.getImgIds()) == [e["index"] + 1 for e in kept]
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["car", "person", "tree"]
    for entry in kept:
        labels = np.asarray(Image.open(ref / entry["files"]["label"]))
        painted = np.zeros_like(labels)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=entry["index"] + 1)):
            mask = coco.annToMask(ann).astype(bool)
            assert not (painted[mask] > 0).any()  # instances do not overlap
            painted[mask] = ann["category_id"]
        assert np.array_equal(painted, np.where(labels == 255, 0, labels))


def test_huggingface_export_loads_with_datasets(setup, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = SPEC.format(model=str(setup / "tiny"), count=1).replace(
        "filter: {area_percentiles: [10, 100]}", "outputs: {formats: [huggingface], split: val}")
    (tmp_path / "spec.yaml").write_text(spec)
    out = tmp_path / "hf"
    assert generate(load_spec(tmp_path / "spec.yaml"), out, threads=1, progress=False).finalized
    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    loaded = datasets.load_dataset(str(out / "huggingface"), cache_dir=str(tmp_path / "cache"))
    assert list(loaded) == ["val"] and loaded["val"].num_rows == len(entries) == 3
    for row, entry in zip(loaded["val"], entries, strict=True):
        assert (row["prompt"], row["seed"], row["index"]) == (entry["prompt"], entry["seed"], entry["index"])
        assert np.array_equal(np.asarray(row["label"]), np.asarray(Image.open(out / entry["files"]["label"])))
        assert np.array_equal(np.asarray(row["image"]), np.asarray(Image.open(out / entry["files"]["image"])))
    id2label = json.loads((out / "huggingface" / "id2label.json").read_text())
    assert id2label == {"0": "background", "1": "car", "2": "person", "3": "tree"}
    assert not (out / "cityscapes").exists() and not (out / "coco").exists()


def test_same_spec_twice_is_byte_identical_and_rerun_skips(setup, tmp_path):
    out = tmp_path / "again"
    result = generate(load_spec(setup / "spec.yaml"), out, threads=1, progress=False,
                      spec_text=(setup / "spec.yaml").read_text())
    assert result.generated == 12 and result.finalized
    assert_same_dataset(setup / "ref", out)
    before = (out / "shards" / "manifest-00000-of-00001.jsonl").read_bytes()
    again = generate(load_spec(setup / "spec.yaml"), out, threads=1, progress=False)
    assert (again.generated, again.skipped) == (0, 12)
    assert (out / "shards" / "manifest-00000-of-00001.jsonl").read_bytes() == before


def test_sigkill_then_rerun_equals_uninterrupted_run(setup, tmp_path):
    out = tmp_path / "killed"
    proc = cli_process("generate", str(setup / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress")
    shard = out / "shards" / "manifest-00000-of-00001.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if shard.exists() and shard.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished = shard.read_bytes().count(b"\n")
    assert 3 <= finished < 12, "the kill did not land mid-run"
    assert not (out / "manifest.jsonl").exists()
    assert cli("generate", str(setup / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress") == 0
    lines = shard.read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(12))  # nothing twice, nothing lost
    assert not list(out.rglob("*.tmp"))
    assert_same_dataset(setup / "ref", out)


def test_two_shards_merge_equals_single_process(setup, tmp_path):
    out = tmp_path / "sharded"
    procs = [cli_process("generate", str(setup / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress",
                         env={"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}) for rank in (0, 1)]
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
        assert "run: opendaam dataset merge" in stdout
        assert stdout.startswith(f"opendaam dataset generate: process {procs.index(proc)} of 2 ")  # first line
    for rank in (0, 1):
        lines = (out / "shards" / f"manifest-0000{rank}-of-00002.jsonl").read_text().splitlines()
        assert [json.loads(line)["index"] for line in lines] == list(range(rank, 12, 2))
    assert not (out / "manifest.jsonl").exists()
    assert cli("merge", str(out)) == 0
    assert_same_dataset(setup / "ref", out)


def test_merge_refuses_missing_items(setup, tmp_path):
    out = tmp_path / "partial"
    result = generate(load_spec(setup / "spec.yaml"), out, threads=1, progress=False, limit=5)
    assert (result.generated, result.finalized) == (5, False)
    with pytest.raises(DatasetError, match=r"7 of 12 items are not finished \(indices 5, 6, 7, 8, 9, \.\.\.\)"):
        cli("merge", str(out))


def test_other_spec_is_refused_unless_forced(setup, tmp_path):
    spec2 = setup / "spec2.yaml"
    spec2.write_text(SPEC.format(model="tiny", count=1).replace("steps: 2", "steps: 1"))
    out = tmp_path / "forced"
    generate(load_spec(setup / "spec.yaml"), out, threads=1, progress=False, limit=4)
    with pytest.raises(DatasetError, match="holds a dataset made from a different spec .* pass --force"):
        cli("generate", str(spec2), "--out", str(out), "--threads", "1", "--no-progress")
    assert cli("generate", str(spec2), "--out", str(out), "--threads", "1", "--no-progress", "--force") == 0
    fresh = tmp_path / "fresh"
    assert cli("generate", str(spec2), "--out", str(fresh), "--threads", "1", "--no-progress") == 0
    assert_same_dataset(fresh, out)  # the old spec's items and exports are gone
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="is not empty and holds no opendaam dataset"):
        cli("generate", str(spec2), "--out", str(stranger), "--no-progress")


def test_write_error_is_clear_and_leaves_nothing_half_written(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "readonly"
    generate(load_spec(setup / "spec.yaml"), out, threads=1, progress=False, limit=2)
    real_replace = os.replace

    def deny(src, dst):
        if str(dst).endswith(".png"):
            raise PermissionError(13, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", deny)
    with pytest.raises(WriteError, match=r"cannot write .*000002.png: Permission denied; check that you may write"):
        cli("generate", str(setup / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress")
    monkeypatch.setattr(os, "replace", real_replace)
    assert not list(out.rglob("*.tmp"))
    lines = (out / "shards" / "manifest-00000-of-00001.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == [0, 1]
    assert cli("generate", str(setup / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress") == 0
    assert_same_dataset(setup / "ref", out)


def test_check_lists_items(setup, capsys):
    assert cli("check", str(setup / "spec.yaml"), "--items") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{setup / 'spec.yaml'}: valid; 3 classes, 3 prompts x 4 seeds = 12 items")
    assert out[9] == "000008\tseed 0\ta car and a person next to a tree\t[car, person, tree]"



@pytest.mark.parametrize("method", ["linear", "open_vocab"])
def test_word_and_token_maps_match_heatmaps(setup, tmp_path, method):
    import torch

    from opendaam.heatmaps import heatmaps
    from opendaam.models import load_pipeline
    from opendaam.optimize import OptimizedToken, load_token
    from opendaam.tracing import trace

    rows = 1 if method == "linear" else 2  # open_vocab tokens carry an object and a background row
    token = OptimizedToken(torch.randn(rows, 32, generator=torch.Generator().manual_seed(3)), "car",
                           {"text_dim": 32, "method": method})
    token.save(tmp_path / "car.safetensors")
    (tmp_path / "spec.yaml").write_text(textwrap.dedent(f"""\
        model: {setup / 'tiny'}
        steps: 2
        height: 32
        width: 32
        seeds: [7]
        method: {method}
        classes:
          - name: car
            words: [car, automobile]
            token: car.safetensors
          - name: tree
        prompts: ["a {{car}} near a {{tree}}"]
        outputs: {{formats: []}}
        """))
    out = tmp_path / "out"
    assert cli("generate", str(tmp_path / "spec.yaml"), "--out", str(out), "--threads", "1", "--no-progress") == 0
    maps = read_npz(out / "maps" / "000000.npz")

    pipe = load_pipeline(setup / "tiny")
    pipe.set_progress_bar_config(disable=True)
    with trace(pipe, prompt="a car near a tree", queries=method == "open_vocab") as tracer:
        pipe("a car near a tree", generator=torch.Generator().manual_seed(7), num_inference_steps=2, height=32,
             width=32, output_type="np")
    record = tracer.records[0]
    queries = {"car": ["car", "automobile", load_token(tmp_path / "car.safetensors", pipe=pipe)], "tree": ["tree"]}
    for name, words in queries.items():
        soft = torch.stack([heatmaps(record, [w], method, pipe=pipe).soft[0] for w in words]).mean(0)  # (H, W)
        if method == "linear":
            expected = (soft - soft.min()) / (soft.max() - soft.min())
        else:
            expected = soft / soft.max()
        assert np.allclose(maps[name].astype(np.float32), expected.detach().numpy(), atol=2e-3), name
    manifest = json.loads((out / "manifest.jsonl").read_text())
    assert manifest["provenance"]["normalize"] == ("minmax" if method == "linear" else "max")
    assert not (out / "cityscapes").exists() and not (out / "coco").exists()
