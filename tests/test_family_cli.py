"""`opendaam generate` on every family's saved pipeline folder: the real loading path, maps on disk; linear on joint
attention refused before the model loads."""

import json

import numpy as np
import pytest

from opendaam._tiny import build_tiny_pipeline
from opendaam.cli import main


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}
    for family in ("sdxl", "sd3", "flux"):
        folder = tmp_path_factory.mktemp(family)
        build_tiny_pipeline(family, seed=0).save_pretrained(folder)
        made[family] = folder
    return made


@pytest.mark.parametrize("family, method", [("sdxl", "open_vocab"), ("sd3", "daam"), ("sd3", "open_vocab"),
                                            ("flux", "open_vocab")])
def test_generate_every_family(folders, tmp_path, family, method):
    out = tmp_path / "out"
    words = ["car", "tree"] if method == "open_vocab" else ["car"]
    code = main(["generate", "a red car on a street", "--model", str(folders[family]), "--steps", "2",
                 "--height", "32", "--width", "32", "--method", method, "--words", *words, "--threads", "1",
                 "--out", str(out)])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [w["word"] for w in summary["words"]] == words
    soft = np.load(out / "maps" / "car.npy")
    assert soft.shape == (32, 32) and np.isfinite(soft).all() and soft.max() > 0
    assert (out / "record.safetensors").exists()


def test_linear_on_joint_attention_is_refused_before_loading(folders, tmp_path, capsys):
    code = main(["generate", "a red car", "--model", str(folders["flux"]), "--method", "linear", "--out",
                 str(tmp_path / "out")])
    assert code == 2
    assert "--method linear needs keys linear in the text" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
