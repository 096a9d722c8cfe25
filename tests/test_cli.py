"""The command line on a tiny pipeline saved to a folder (the real from_pretrained path)."""

import json

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
    assert grid.size[0] == 7 * 128  # the image and six words
    assert set(summary["images"][0]["maps"]) == {"daam", "open_vocab", "linear"}
