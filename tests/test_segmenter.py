"""The synthetic-to-real experiment at a tiny size: end to end, seeds, resume, bad input, the metric."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")

from opendaam.metrics import class_confusion, iou_score  # noqa: E402
from opendaam.segmenter import (  # noqa: E402
    SegmenterConfig,
    check_config,
    check_seeds,
    load_export,
    real_labels,
    run_segmenter,
    seen_seeds,
    write_real_set,
)

TINY = dict(train_per_class=1, few_real_per_class=1, test_size=4, token_per_class=1, token_epochs=3, train_steps=2,
            batch=2, hidden_sizes=(8, 16, 32, 64), decoder_size=16, threads=1)


@pytest.fixture(scope="module")
def toy_pipe():
    from opendaam.models import load_pipeline

    pipe = load_pipeline("toy-urban")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def tiny_run(toy_pipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("segmenter")
    config = SegmenterConfig(classes=("car", "person"), steps=2, **TINY)
    return out, config, run_segmenter(toy_pipe, out, config, progress=False, log=lambda _: None)


def _export_seeds(path: Path) -> set[int]:
    import pyarrow.parquet as pq

    return {int(s) for f in sorted((path / "data").glob("*.parquet")) for s in pq.read_table(f)["seed"].to_pylist()}


def test_end_to_end_summary_and_files(tiny_run):
    out, config, summary = tiny_run
    assert set(summary["miou"]) == {"real_only", "synthetic_only", "few_real", "few_real_plus_synthetic"}
    assert set(summary["miou"]["synthetic_only"]) == {"daam", "refined", "tokens"}
    assert set(summary["miou"]["few_real_plus_synthetic"]) == {"daam", "refined", "tokens"}
    arms = ["real_only", "synthetic_only/daam", "synthetic_only/refined", "synthetic_only/tokens", "few_real",
            "few_real_plus_synthetic/daam", "few_real_plus_synthetic/refined", "few_real_plus_synthetic/tokens"]
    assert list(summary["iou"]) == arms
    assert all(list(summary["iou"][a]) == ["background", "car", "person"] for a in arms)
    assert summary["sizes"]["train"] == 2 and summary["sizes"]["few_real"] == 2 and summary["sizes"]["test"] == 4
    assert {n: v["images"] for n, v in summary["sizes"]["synthetic"].items()} == {"daam": 2, "refined": 2, "tokens": 2}
    assert summary["time_s"]["total"] > 0 and set(summary["time_s"]["arms"]) == set(arms)
    assert json.loads((out / "summary.json").read_text())["miou"] == summary["miou"]
    assert "| real_only |" in (out / "tables.md").read_text()
    assert (out / "miou.csv").read_text().splitlines()[0] == "training set,mIoU,background,car,person"
    for arm in arms:
        folder = out / "arms" / arm.replace("/", "-")
        assert (folder / "model.safetensors").is_file() and (folder / "result.json").is_file()
    # every mIoU is the mean of its per-class IoUs (recomputed from the stored confusion counts)
    for arm in arms:
        result = json.loads((out / "arms" / arm.replace("/", "-") / "result.json").read_text())
        iou = iou_score(torch.tensor(result["confusion"]))
        expected = 100 * iou[~iou.isnan()].mean().item()
        assert result["miou"] == pytest.approx(expected, abs=0.02)


def test_held_out_seeds_are_disjoint_from_every_training_seed(tiny_run):
    out, config, summary = tiny_run
    test = _export_seeds(out / "real" / "test" / "huggingface")
    assert test == set(range(config.test_seed0, config.test_seed0 + 4))
    used = {"real": _export_seeds(out / "real" / "train" / "huggingface")}
    for name in ("daam", "refined", "tokens"):
        used[name] = _export_seeds(out / "synthetic" / name / "huggingface")
    used["token scenes"] = {item["seed"] for item in json.loads((out / "tokens" / "scenes" / "items.json").read_text())
                            ["items"]}
    assert all(used.values())
    for name, seeds in used.items():
        assert not seeds & test, name
    for name, seen in seen_seeds().items():
        assert not any(s in seen for s in test), name
        assert not any(s in seen for s in used["real"] | used["token scenes"]), name
    assert summary["seeds"]["held-out scenes"] == [config.test_seed0, config.test_seed0 + 4]


def test_synthetic_sets_share_images_and_differ_in_labels(tiny_run):
    out, _, _ = tiny_run
    images = {n: load_export(out / "synthetic" / n / "huggingface") for n in ("daam", "refined", "tokens")}
    assert np.array_equal(images["daam"][0], images["refined"][0])
    assert np.array_equal(images["daam"][0], images["tokens"][0])
    assert not np.array_equal(images["daam"][1], images["tokens"][1])


def test_rerun_resumes_without_training_again(tiny_run, toy_pipe):
    out, config, summary = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "arms").rglob("*.safetensors")}
    again = run_segmenter(toy_pipe, out, config, progress=False, log=lambda _: None)
    assert again["miou"] == summary["miou"]
    assert {p: p.stat().st_mtime_ns for p in (out / "arms").rglob("*.safetensors")} == stamps
    assert "segmenters" not in again["time_s"]


def test_folder_of_another_run_is_refused(tiny_run, toy_pipe):
    out, config, _ = tiny_run
    from dataclasses import replace

    with pytest.raises(ValueError, match=r"holds a run with other settings \(train_steps\)"):
        run_segmenter(toy_pipe, out, replace(config, train_steps=3), progress=False)


def test_labeller_without_token_file_is_refused_before_any_write(tmp_path, toy_pipe):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    (tokens / "car.safetensors").write_bytes(b"")
    config = SegmenterConfig(classes=("car", "traffic light"), tokens=str(tokens), **TINY)
    with pytest.raises(FileNotFoundError, match=r"no token file for traffic light \(.*traffic_light.safetensors\)"):
        run_segmenter(toy_pipe, tmp_path / "run", config, progress=False)
    assert not (tmp_path / "run").exists()


def test_empty_synthetic_set_after_filtering(tmp_path, toy_pipe):
    config = SegmenterConfig(classes=("car",), labellers=("daam",), min_confidence=1.0, steps=2, **TINY)
    with pytest.raises(ValueError, match="daam labeller's synthetic set .* has no image left after its filters"):
        run_segmenter(toy_pipe, tmp_path / "run", config, progress=False, log=lambda _: None)
    assert not (tmp_path / "run" / "arms").exists() and not (tmp_path / "run" / "summary.json").exists()


@pytest.mark.parametrize("change, message", [
    (dict(test_seed0=5), "held-out scenes [5, 261) overlap diffusion model training [0, 8000): move test_seed0"),
    (dict(real_seed0=100), "real training scenes [100, 228) overlap diffusion model training"),
    (dict(test_seed0=30_000_100), "held-out scenes [30000100, 30000356) overlap real training scenes"),
    (dict(synthetic_seed0=33_000_000), "held-out scenes [33000000, 33000256) overlap synthetic generation"),
])
def test_overlapping_seeds_are_refused(change, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)").replace("(", r"\(")):
        check_seeds(SegmenterConfig(**change))


@pytest.mark.parametrize("change, message", [
    (dict(labellers=()), "labellers is empty"),
    (dict(few_real_per_class=40), "few_real_per_class must be between 1 and train_per_class"),
    (dict(classes=("car", "tree")), "the toy world draws no 'tree'"),
    (dict(min_confidence=2.0), "min_confidence must be in"),
])
def test_bad_options(change, message):
    with pytest.raises(ValueError, match=message):
        check_config(SegmenterConfig(**change))


def test_real_set_labels_are_the_scenes_exact_labels(tmp_path):
    from opendaam.toyworld.scene import LABEL_IDS, render_scene

    seeds = [40_000_000, 40_000_001, 40_000_002]
    images, labels = load_export(write_real_set(tmp_path, seeds, ["car", "person"], forced=["car", "person", "bus"]))
    for k, seed in enumerate(seeds):
        scene = render_scene(seed, cls=["car", "person", "bus"][k])
        assert np.array_equal(images[k], scene.image)
        expected = np.where(scene.labels == LABEL_IDS["car"], 1, np.where(scene.labels == LABEL_IDS["person"], 2, 0))
        assert np.array_equal(labels[k], expected)
        assert np.array_equal(real_labels(scene.labels, ["car", "person"]), expected)
    assert set(np.unique(labels[2]).tolist()) == {0}  # a look-alike scene (bus) is all background


def test_class_confusion_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(3, 8, 8))
    target = rng.integers(0, 4, size=(3, 8, 8))
    target[0, :2] = 255
    keep = target != 255
    matrix = sklearn.confusion_matrix(target[keep], pred[keep], labels=range(4))  # (true, pred)
    counts = class_confusion(torch.from_numpy(pred), torch.from_numpy(target), 4)
    assert counts[:, 0].tolist() == np.diag(matrix).tolist()
    assert counts[:, 1].tolist() == (matrix.sum(0) - np.diag(matrix)).tolist()
    assert counts[:, 2].tolist() == (matrix.sum(1) - np.diag(matrix)).tolist()
    assert counts.sum(1).tolist() == [int(keep.sum())] * 4
    with pytest.raises(ValueError, match="outside 0..3"):
        class_confusion(torch.tensor([4]), torch.tensor([0]), 4)


def test_augment_hook_sees_each_batch_and_what_it_returns_is_trained_on():
    """``augment`` gets every batch after the flips with its shapes; returning the batch unchanged trains the
    same weights as no hook, and what it returns is what is trained on (black images equal a black set)."""
    from opendaam.segmenter import train_segmenter

    cfg = SegmenterConfig(classes=("car",), hidden_sizes=(8, 16, 32, 64), decoder_size=16, train_steps=3, batch=4,
                          seed=3)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, (5, 32, 32), dtype=np.uint8)
    seen = []

    def identity(x, y, generator):
        assert isinstance(generator, torch.Generator)
        seen.append((tuple(x.shape), tuple(y.shape), float(x.min()) >= -1.0 and float(x.max()) <= 1.0))
        return x, y

    torch.manual_seed(0)
    plain = train_segmenter([(images, labels)], cfg)
    torch.manual_seed(0)
    hooked = train_segmenter([(images, labels)], cfg, augment=identity)
    assert seen == [((4, 3, 32, 32), (4, 32, 32), True)] * 3
    for a, b in zip(plain.state_dict().values(), hooked.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    black = train_segmenter([(np.zeros_like(images), labels)], cfg)  # uint8 0 is -1 at the model's input
    torch.manual_seed(0)
    blacked = train_segmenter([(images, labels)], cfg, augment=lambda x, y, g: (torch.full_like(x, -1.0), y))
    for a, b in zip(black.state_dict().values(), blacked.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, c) for a, c in zip(black.state_dict().values(), plain.state_dict().values(),
                                                         strict=True))
