"""The thesis protocol at a tiny size: shapes, finite values, reproducibility, bad input."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from opendaam.experiments import ThesisConfig, ablation, evaluate, load_items, run_thesis, summarize


class BoxAnnotator:
    """Init images and masks for tests: a grey scene with a box whose place depends on the seed."""

    strength = 0.6

    def init_image(self, cls, seed):
        array = np.full((32, 32, 3), 120, dtype=np.uint8)
        array[8 + seed % 4 : 24, 4:20] = (200, 40, 40)
        return Image.fromarray(array)

    def mask(self, cls, seed, size):
        mask = np.zeros(size, dtype=bool)
        mask[8 + seed % 4 : 24, 4:20] = True
        return mask


@pytest.fixture(scope="module")
def img2img(tiny_pipe):
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


CFG = ThesisConfig(classes=("car", "traffic light"), per_class=4, train_sizes=(1, 2), steps=4, optimize_epochs=15)


@pytest.fixture(scope="module")
def thesis(img2img, tmp_path_factory):
    out = tmp_path_factory.mktemp("thesis")
    return out, run_thesis(img2img, out, CFG, annotator=BoxAnnotator(), progress=False)


def test_tables_have_the_thesis_shape(thesis):
    out, summary = thesis
    methods = summary["methods"]
    assert list(methods) == ["daam", "linear", "daam_opt", "linear_opt", "class_prior", "center_box", "random",
                             "control_word"]
    for rows in methods.values():
        assert list(rows) == ["car", "traffic light", "all"]
        for cls, row in rows.items():
            for key in ("max_miou", "auc"):
                assert math.isfinite(row[key]) and 0 <= row[key] <= 100
            if cls != "all":
                assert row["images"] == 2 and len(row["curve"]) == 21 and len(row["band"]) == 21
    assert list(summary["train_vs_test"]) == ["1", "2"]
    header = (out / "max_miou.csv").read_text().splitlines()[0]
    assert header == "class,daam,linear,daam_opt,linear_opt,class_prior,center_box,random,control_word"
    assert len((out / "auc.csv").read_text().splitlines()) == 4
    assert "Table 4.1" in (out / "tables.md").read_text()
    assert len(list((out / "tokens").glob("*.safetensors"))) == 2 * 2 * 2


def test_all_mean_is_mean_of_classes(thesis):
    _, summary = thesis
    rows = summary["methods"]["daam"]
    assert rows["all"]["max_miou"] == pytest.approx((rows["car"]["max_miou"] + rows["traffic light"]["max_miou"]) / 2)


def test_rerun_is_resumed_and_identical(thesis, img2img):
    out, summary = thesis
    again = run_thesis(img2img, out, CFG, annotator=BoxAnnotator(), progress=False)
    assert json.dumps(again["methods"]) == json.dumps(summary["methods"])


def test_center_box_baseline_scores_known_value(thesis):
    out, summary = thesis
    # the box masks of seeds 2, 3 against a centred box of the prior's area: computed here directly
    items = [i for i in load_items(out / "data") if i.id in summary["test_ids"] and i.cls == "car"]
    assert [i.seed for i in items] == [2, 3]
    prior = np.mean([BoxAnnotator().mask("car", s, (32, 32)) for s in (0, 1)], axis=0)
    area = prior.mean()
    side = round(32 * area**0.5)
    box = np.zeros((32, 32), bool)
    box[(32 - side) // 2 : (32 - side) // 2 + side, (32 - side) // 2 : (32 - side) // 2 + side] = True
    ious = [(box & m).sum() / (box | m).sum() for m in (BoxAnnotator().mask("car", s, (32, 32)) for s in (2, 3))]
    assert summary["methods"]["center_box"]["car"]["max_miou"] == pytest.approx(100 * np.mean(ious), abs=1e-4)


def test_ablation_matrix(thesis):
    out, _ = thesis
    items = load_items(out / "data")[:2]
    result = ablation(items, out / "data")
    assert result["blocks"] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert result["steps"] == [0, 1]  # img2img at strength 0.6 of 4 steps runs 2 U-Net calls
    assert np.array(result["miou"]).shape == (5, 2)
    assert all(0 <= v <= 100 for row in result["miou"] for v in row)


def test_bad_input(thesis, tmp_path, img2img):
    out, _ = thesis
    items = load_items(out / "data")
    with pytest.raises(ValueError, match="unknown methods \\['gradcam'\\]"):
        evaluate(items, out / "data", ["gradcam"])
    with pytest.raises(ValueError, match="leaves no test images"):
        run_thesis(img2img, tmp_path, ThesisConfig(per_class=2, train_sizes=(2,)), annotator=BoxAnnotator())
    # a non-binary mask is refused with its file named
    import shutil

    data = tmp_path / "copy"
    shutil.copytree(out / "data", data)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(data / items[0].mask)
    with pytest.raises(ValueError, match="is not binary"):
        evaluate(items[:1], data, ["daam"])
    (data / items[1].mask).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing for items: {items[1].id}"):
        load_items(data)


def test_summarize_of_evaluation(thesis):
    out, _ = thesis
    items = load_items(out / "data")
    ev = evaluate(items, out / "data", ["daam"], thresholds=torch.tensor([0.0, 0.5, 1.0]))
    assert ev.curves["daam"]["car"].shape == (3, 4, 4)
    rows = summarize(ev)["daam"]
    assert len(rows["car"]["curve"]) == 3
