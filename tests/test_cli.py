"""The command line on a tiny pipeline saved to a folder (the real from_pretrained path)."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from opendaam.cli import main
from opendaam.models import build_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    build_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["daam", "open_vocab", "linear"])
def test_generate_writes_outputs(model_dir, tmp_path, method):
    words = ["car", "traffic light"] if method == "daam" else ["car", "tree"]
    code = main(["generate", "a red car and a traffic light", "--model", str(model_dir), "--steps", "2",
                 "--height", "32", "--width", "48", "--words", *words, "--method", method,
                 "--out", str(tmp_path), "--threads", "1"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [w["word"] for w in summary["words"]] == words
    assert summary["num_inference_steps"] == 2 and summary["provenance"]["unet_calls"] == 2
    for entry in summary["words"]:
        soft = np.load(tmp_path / "maps" / f"{entry['file']}.npy")
        assert soft.shape == (32, 48)
        assert np.isclose(soft.max(), entry["max"], rtol=1e-5)
        mask = np.array(Image.open(tmp_path / "masks" / f"{entry['file']}.png"))
        if method == "linear":
            expected = (soft - soft.min()) / (soft.max() - soft.min()) >= 0.4
        else:
            expected = soft >= 0.4 * soft.max()
        assert np.array_equal(mask > 0, expected)
    assert Image.open(tmp_path / "image.png").size == (48, 32)
    assert (tmp_path / "record.safetensors").exists()
    if method == "daam":
        assert summary["words"][1]["token_indices"] == [6, 7]


def test_generate_unknown_word_lists_prompt_words(model_dir, tmp_path, capsys):
    code = main(["generate", "a red car", "--model", str(model_dir), "--steps", "1", "--words", "tree",
                 "--out", str(tmp_path)])
    assert code == 2
    assert "its words are: a, red, car" in capsys.readouterr().err


def test_generate_unknown_method(model_dir, tmp_path, capsys):
    code = main(["generate", "a red car", "--model", str(model_dir), "--steps", "1", "--method", "gradcam",
                 "--out", str(tmp_path)])
    assert code == 2
    assert "choose one of: daam, open_vocab, linear" in capsys.readouterr().err


def test_demo_on_any_model(model_dir, tmp_path):
    assert main(["demo", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["images"]) == 4
    grid = Image.open(tmp_path / "traffic_light_maps.png")
    assert 7 * 256 < grid.size[0] < 8 * 256  # the image and six words at 256 px, then the colorbar
    assert set(summary["images"][0]["maps"]) == {"daam", "open_vocab", "linear"}


def test_optimize_then_generate_with_token(model_dir, tmp_path):
    runs = tmp_path / "runs"
    for seed in range(3):
        assert main(["generate", "a red car", "--model", str(model_dir), "--steps", "2", "--seed", str(seed),
                     "--out", str(runs / f"img{seed}"), "--words", "car"]) == 0
    masks = tmp_path / "masks"
    masks.mkdir()
    for seed in range(3):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[8:, :6] = 255
        Image.fromarray(mask).save(masks / f"img{seed}.png")
    token_path = tmp_path / "car.safetensors"
    assert main(["optimize", "--records", str(runs), "--masks", str(masks), "--class", "car", "--train", "2",
                 "--epochs", "20", "--model", str(model_dir), "--explain", "3", "--out", str(token_path)]) == 0
    from opendaam.optimize import load_token

    token = load_token(token_path)
    assert token.meta["train_images"] == ["img0", "img1"] and len(token.meta["nearest_words"]) == 3
    out = tmp_path / "with-token"
    assert main(["generate", "a red car", "--model", str(model_dir), "--steps", "2", "--words", "tree", "car",
                 "--token", str(token_path), "--method", "linear", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(w["word"], w["file"], w["token_file"]) for w in summary["words"]] == [
        ("tree", "tree", None), ("car", "car", None), ("car", "car_token", str(token_path))]
    word, optimized = np.load(out / "maps" / "car.npy"), np.load(out / "maps" / "car_token.npy")
    assert word.shape == optimized.shape == (16, 16) and not np.array_equal(word, optimized)
    assert {p.name for p in (out / "overlays").iterdir()} >= {"car.png", "car_token.png"}


def test_optimize_reports_missing_masks(model_dir, tmp_path, capsys):
    main(["generate", "a red car", "--model", str(model_dir), "--steps", "1", "--out", str(tmp_path / "r" / "a")])
    (tmp_path / "m").mkdir()
    code = main(["optimize", "--records", str(tmp_path / "r"), "--masks", str(tmp_path / "m"), "--class", "car",
                 "--out", str(tmp_path / "t.safetensors")])
    assert code == 2
    assert "for records: a" in capsys.readouterr().err


def test_experiment_with_user_masks_then_evaluate(model_dir, tmp_path, capsys):
    out = tmp_path / "exp"
    masks = tmp_path / "user-masks"
    args = ["experiment", "thesis", "--model", str(model_dir), "--masks", str(masks), "--per-class", "3",
            "--train", "1", "--classes", "car", "--steps", "2", "--epochs", "5", "--out", str(out)]
    assert main(args) == 2  # no masks yet: the images are generated, the missing masks listed
    assert "for: car_0, car_1, car_2" in capsys.readouterr().err
    assert len(list((out / "data" / "records").glob("*.safetensors"))) == 3
    masks.mkdir()
    for seed in range(3):
        mask = np.zeros((16, 16), dtype=np.uint8)
        mask[4:12, 2 + seed : 10 + seed] = 255
        Image.fromarray(mask).save(masks / f"car_{seed}.png")
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_ids"] == ["car_1", "car_2"]
    assert (out / "curves.png").exists() and (out / "max_miou.csv").exists()
    ev = tmp_path / "eval"
    assert main(["evaluate", "--records", str(out / "data" / "records"), "--masks", str(out / "data" / "masks"),
                 "--methods", "daam", "linear_opt", "--tokens", str(out / "tokens"), "--train", "1",
                 "--per-layer", "--per-step", "--out", str(ev)]) == 0
    rows = (ev / "max_miou.csv").read_text().splitlines()
    assert rows[0] == "class,daam,linear_opt,class_prior,center_box,random,control_word"
    assert len(rows) == 3  # car and all
    ablation = json.loads((ev / "ablation.json").read_text())
    assert np.array(ablation["miou"]).shape == (5, 2)
    assert (ev / "ablation.png").exists() and (ev / "ablation.csv").exists()
    # the same daam number as the experiment's own table (same test images, same thresholds)
    assert float(rows[1].split(",")[1]) == pytest.approx(summary["methods"]["daam"]["car"]["max_miou"], abs=0.05)
    # open_vocab without --model: the pipeline comes from the records' own provenance
    records, mask_dir = str(out / "data" / "records"), str(out / "data" / "masks")
    assert main(["evaluate", "--records", records, "--masks", mask_dir, "--methods", "open_vocab", "--train", "1",
                 "--out", str(tmp_path / "ov")]) == 0
    assert (tmp_path / "ov" / "max_miou.csv").read_text().startswith("class,open_vocab,")
    # two tokens for the same method and class are refused, naming both files
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("a", "b"):
        shutil.copy(out / "tokens" / "car_linear_1.safetensors", twice / f"{name}.safetensors")
    capsys.readouterr()
    assert main(["evaluate", "--records", records, "--masks", mask_dir, "--methods", "linear_opt", "--tokens",
                 str(twice), "--train", "1", "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "two linear tokens for 'car'" in err and "a.safetensors" in err and "b.safetensors" in err
    # --pool leaves more images out than the prior uses (the experiment's tables: --train 2 --pool 5)
    assert main(["evaluate", "--records", records, "--masks", mask_dir, "--train", "1", "--pool", "2",
                 "--out", str(tmp_path / "pool")]) == 0
    assert json.loads((tmp_path / "pool" / "summary.json").read_text())["test_ids"] == ["car_2"]
    assert main(["evaluate", "--records", records, "--masks", mask_dir, "--train", "1", "--pool", "0",
                 "--out", str(tmp_path / "pool0")]) == 2
    assert "--pool 0 is smaller than --train 1" in capsys.readouterr().err


def test_evaluate_class_without_test_images(model_dir, tmp_path, capsys):
    main(["generate", "a red car", "--model", str(model_dir), "--steps", "1", "--out", str(tmp_path / "r" / "a")])
    (tmp_path / "m").mkdir()
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "m" / "a.png")
    code = main(["evaluate", "--records", str(tmp_path / "r"), "--masks", str(tmp_path / "m"), "--class", "car",
                 "--train", "1", "--out", str(tmp_path / "e")])
    assert code == 2
    assert "classes with no test images: car" in capsys.readouterr().err
