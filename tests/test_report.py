"""The HTML report: one self-contained page per output folder, an embedded image per map."""

import base64
import io
import json
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from opendaam.cli import main
from opendaam.models import build_pipeline
from opendaam.report import write_html


class _Page(HTMLParser):
    """Collects the tags and attributes of a page."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(path):
    page = _Page()
    text = path.read_text(encoding="utf-8")
    page.feed(text)
    page.close()
    return page, text


def _check_self_contained(page, text):
    """Every picture is an embedded PNG that decodes; nothing is fetched from elsewhere."""
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1]))).verify()
    assert "http://" not in text and "https://" not in text
    assert not [tag for tag, _ in page.tags if tag in ("script", "link", "iframe")]
    return images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-model")
    build_pipeline("tiny", seed=0).save_pretrained(folder)
    return folder


def test_demo_writes_report(model_dir, tmp_path):
    assert main(["demo", "--model", str(model_dir), "--steps", "2", "--out", str(tmp_path), "--threads", "1"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    page, text = _parse(tmp_path / "index.html")
    images = _check_self_contained(page, text)
    maps = sum(len(labels) for entry in summary["images"] for labels in entry["maps"].values())
    assert len(images) == len(summary["images"]) + maps  # the image, then one overlay per map
    for entry in summary["images"]:
        assert entry["prompt"] in text
        with np.load(tmp_path / entry["arrays"]) as arrays:
            assert {m: arrays[m].shape[0] for m in arrays.files} == {m: len(v) for m, v in entry["maps"].items()}


def test_report_of_generate_folder(model_dir, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "a red car", "--model", str(model_dir), "--steps", "2", "--height", "32", "--width",
                 "48", "--words", "car", "tree", "--method", "open_vocab", "--out", str(out), "--threads", "1"]) == 0
    path = write_html(out, out=tmp_path / "report.html", title="a red car")
    page, text = _parse(path)
    images = _check_self_contained(page, text)
    assert len(images) == 1 + 2
    assert [a["alt"] for a in images[1:]] == ["car (open_vocab)", "tree (open_vocab)"]
    assert "colour scale shared by the row" in text and "provenance.model" in text
    assert not (out / "index.html").exists()


def test_report_of_other_folder_and_errors(tmp_path):
    Image.new("RGB", (10, 10), "red").save(tmp_path / "curves.png")
    (tmp_path / "tables.md").write_text("| class | daam |\n|---|---|\n| car | 54.0 |\n")
    page, text = _parse(write_html(tmp_path))
    assert len(_check_self_contained(page, text)) == 1 and "| car | 54.0 |" in text
    with pytest.raises(FileNotFoundError, match="no summary.json and no PNG"):
        write_html(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None)
    with pytest.raises(FileNotFoundError, match="no folder"):
        write_html(tmp_path / "missing")


def test_report_of_dataset_folder(tiny_pipe, tmp_path):
    from opendaam.dataset import expand_items, generate, parse_spec

    spec = parse_spec({"classes": [{"name": "car", "prompts": ["a {} on a street"]}, {"name": "tree"}],
                       "prompts": ["a {car} next to a {tree}"], "seeds": [0, 1], "steps": 1, "height": 32,
                       "width": 32})
    generate(spec, tmp_path, pipe=tiny_pipe, threads=1, progress=False, finalize=False)
    page, text = _parse(write_html(tmp_path, limit=1))
    images = _check_self_contained(page, text)
    finished = sum(len(path.read_text().splitlines()) for path in (tmp_path / "shards").glob("*.jsonl"))
    assert len(images) == 1 and finished == len(expand_items(spec)) and f"items (1 of {finished})" in text
    figure = Image.open(io.BytesIO(base64.b64decode(images[0]["src"].split(",", 1)[1]))).convert("RGB")
    labels = np.array(Image.open(tmp_path / "labels" / "000000.png"))
    if (labels == 1).any():  # car pixels are drawn in Cityscapes' car colour
        assert (np.asarray(figure) == (0, 0, 142)).all(axis=-1).any()


def test_report_command(tmp_path, capsys):
    """`opendaam report DIR` writes the page for a folder, and refuses a missing folder in one line."""
    from PIL import Image

    from opendaam.cli import main

    folder = tmp_path / "pictures"
    folder.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(folder / "red.png")
    assert main(["report", str(folder)]) == 0
    page = (folder / "index.html").read_text()
    assert "data:image/png;base64," in page and "http" not in page.split("<body", 1)[1].lower().replace(
        "http-equiv", "")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err
