"""The thesis experiment and the demo on the bundled toy-urban model, at a small size."""

import json
import math

import pytest

from opendaam.models import BUNDLED_MODELS

pytestmark = pytest.mark.skipif(not (BUNDLED_MODELS["toy-urban"] / "model_index.json").exists(),
                                reason="toy-urban weights not installed")


def test_thesis_experiment_small(tmp_path):
    from opendaam.cli import main

    out = tmp_path / "thesis"
    assert main(["experiment", "thesis", "--per-class", "3", "--train", "1", "2", "--steps", "6",
                 "--epochs", "20", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    methods = summary["methods"]
    assert set(methods) >= {"daam", "linear", "daam_opt", "linear_opt", "class_prior", "center_box", "random",
                            "control_word"}
    for rows in methods.values():
        assert list(rows) == ["car", "person", "traffic light", "rider", "all"]
        for row in rows.values():
            assert all(math.isfinite(row[k]) and 0 <= row[k] <= 100 for k in ("max_miou", "auc"))
    assert list(summary["train_vs_test"]) == ["1", "2"]
    lines = (out / "max_miou.csv").read_text().splitlines()
    assert len(lines) == 6 and len(lines[0].split(",")) == 1 + len(methods)
    assert (out / "curves.png").exists()


def test_demo(tmp_path):
    from opendaam.cli import main

    assert main(["demo", "--out", str(tmp_path), "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [i["prompt"] for i in summary["images"]][2] == "a traffic light in an urban environment"
    assert summary["images"][0]["maps"]["linear"].keys() >= {"car", "tree", "sky"}
