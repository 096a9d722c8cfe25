"""Every bad input gets one line and an exit code (2 bad input, 1 cannot run here) before any model loads,
and leaves nothing behind; optional packages are checked up front; -v/-q; optimize --class; tokens mixed
with words for open_vocab."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from opendaam.cli import main
from opendaam.models import build_pipeline
from opendaam.optimize import OptimizedToken


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    build_pipeline("tiny", seed=0).save_pretrained(root / "tiny")
    broken = root / "no-unet"
    build_pipeline("tiny", seed=0).save_pretrained(broken)
    import shutil

    shutil.rmtree(broken / "unet")
    (root / "plain.txt").write_text("hello")
    (root / "afile").write_text("x")
    assert main(["generate", "a red car", "--model", str(root / "tiny"), "--steps", "1",
                 "--out", str(root / "records" / "car0")]) == 0
    good = (root / "records" / "car0" / "record.safetensors").read_bytes()
    bad = root / "bad-records"
    for name, data in (("truncated", good[: len(good) // 2]), ("pickle", pickle.dumps({"a": 1})),
                       ("foreign", None)):
        (bad / name).mkdir(parents=True)  # bad/<name>/<name>.safetensors: record id <name>
        if data is None:
            from safetensors.torch import save_file

            save_file({"x": torch.zeros(2)}, str(bad / name / f"{name}.safetensors"))
        else:
            (bad / name / f"{name}.safetensors").write_bytes(data)
    masks = root / "masks"
    masks.mkdir()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    for name in ("car0", "truncated", "pickle", "foreign"):
        Image.fromarray(mask).save(masks / f"{name}.png")
    jpeg = root / "jpeg-masks"
    jpeg.mkdir()
    Image.fromarray(mask).convert("RGB").save(jpeg / "car0.png", format="JPEG")
    empty = root / "empty-masks"
    empty.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(empty / "car0.png")
    OptimizedToken(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), "car",
                   {"text_dim": 32, "method": "open_vocab"}).save(root / "ov.safetensors")
    return root


def gen(files, *extra, prompt="a red car"):
    return ["generate", prompt, "--model", str(files / "tiny"), "--steps", "1", *extra]


CASES = [  # (argv builder, exit code, message part)
    (lambda f, o: gen(f, "--out", o, prompt=""), 2, "the prompt is empty"),
    (lambda f, o: gen(f, "--out", o, "--words"), 2, "--words needs at least one word"),
    (lambda f, o: gen(f, "--out", o, "--steps", "0"), 2, "--steps must be an integer >= 1, got 0"),
    (lambda f, o: gen(f, "--out", o, "--steps", "-3"), 2, "--steps must be an integer >= 1, got -3"),
    (lambda f, o: gen(f, "--out", o, "--threads", "0"), 2, "--threads must be an integer >= 1"),
    (lambda f, o: gen(f, "--out", o, "--seed", "-1"), 2, "--seed must be an integer >= 0 and <= 9223372036854775807"),
    (lambda f, o: gen(f, "--out", o, "--seed", "18446744073709551615"), 2, "--seed must be an integer"),
    (lambda f, o: gen(f, "--out", o, "--guidance", "-5"), 2, "--guidance must be a number >= 0"),
    (lambda f, o: gen(f, "--out", o, "--guidance", "nan"), 2, "--guidance must be a number >= 0"),
    (lambda f, o: gen(f, "--out", o, "--tau", "1.5"), 2, "--tau must be a number >= 0 and <= 1, got 1.5"),
    (lambda f, o: gen(f, "--out", o, "--method", "daaam"), 2, "--method 'daaam' is unknown; choose one of: daam"),
    (lambda f, o: gen(f, "--out", o, "--words", "tree"), 2, "'tree' is not in the prompt; its words are: a, red, car"),
    (lambda f, o: gen(f, "--out", o, "--height", "60"), 2, "--height 60 is not a multiple of 8"),
    (lambda f, o: gen(f, "--out", o, "--scheduler", "fancy"), 2, "--scheduler 'fancy' is unknown"),
    (lambda f, o: gen(f, "--out", o, prompt="a car " + "very " * 80), 2,
     "tokens but the text encoder reads at most 77"),
    (lambda f, o: ["generate", "a car", "--model", str(f / "nope"), "--out", o], 2, "no such folder, bundled model"),
    (lambda f, o: ["generate", "a car", "--model", str(f / "no-unet"), "--out", o], 2,
     "incomplete pipeline folder: unet/ is missing"),
    (lambda f, o: gen(f, "--out", str(f / "afile")), 2, "is a file, not a folder"),
    (lambda f, o: gen(f, "--out", o, "--method", "linear", "--token", str(f / "plain.txt")), 2,
     "not an opendaam token file"),
    (lambda f, o: gen(f, "--out", o, "--token", str(f / "ov.safetensors")), 2,
     "daam cannot map them: use --method linear"),
    (lambda f, o: ["optimize", "--records", str(f / "bad-records" / "truncated"), "--masks", str(f / "masks"),
                   "--class", "car", "--out", o + "/t.safetensors"], 2, "not an opendaam record:"),
    (lambda f, o: ["optimize", "--records", str(f / "bad-records" / "pickle"), "--masks", str(f / "masks"),
                   "--class", "car", "--out", o + "/t.safetensors"], 2, "not an opendaam record:"),
    (lambda f, o: ["optimize", "--records", str(f / "bad-records" / "foreign"), "--masks", str(f / "masks"),
                   "--class", "car", "--out", o + "/t.safetensors"], 2, "without opendaam's metadata"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "jpeg-masks"), "--class", "car",
                   "--out", o + "/t.safetensors"], 2, "is a JPEG image, not a PNG"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "empty-masks"), "--class", "car",
                   "--out", o + "/t.safetensors"], 2, "is empty: the object must cover at least one pixel"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "masks"), "--class", "person",
                   "--out", o + "/t.safetensors"], 2, "--class 'person': none of the 1 records is of this class"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "masks"), "--class", "car",
                   "--init", "automobile", "--out", o + "/t.safetensors"], 2,
     "'automobile' is in none of the records' prompts: add --model"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "masks"), "--class", "car",
                   "--method", "open_vocab", "--out", o + "/t.safetensors"], 2, "open_vocab needs the pipeline's"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "masks"), "--class", "car",
                   "--epochs", "0", "--out", o + "/t.safetensors"], 2, "--epochs must be an integer >= 1"),
    (lambda f, o: ["optimize", "--records", str(f / "records"), "--masks", str(f / "masks"), "--class", "car",
                   "--lr", "nan", "--out", o + "/t.safetensors"], 2, "--lr must be a number > 0, got nan"),
    (lambda f, o: ["nearest", str(f / "plain.txt"), "--model", str(f / "tiny")], 2, "not an opendaam token file"),
    (lambda f, o: ["nearest", str(f / "ov.safetensors"), "--model", str(f / "tiny"), "--k", "0"], 2,
     "--k must be an integer >= 1"),
    (lambda f, o: ["toyworld", "render", "--seed", "-1", "--out", o], 2, "--seed must be an integer >= 0"),
    (lambda f, o: ["experiment", "thesis", "--per-class", "0", "--out", o], 2, "--per-class must be an integer >= 1"),
    (lambda f, o: ["experiment", "segmenter", "--few-real", "0", "--out", o], 2, "--few-real must be an integer"),
    (lambda f, o: ["experiment", "segmenter", "--tokens", str(f / "masks"), "--out", o], 2,
     "no token file for car ("),
    (lambda f, o: ["experiment", "segmenter", "--model", "org/some-model", "--out", o], 2,
     "the segmenter experiment scores on the toy world's rendered scenes: use --model toy-urban"),
    (lambda f, o: ["evaluate", "--records", str(f / "bad-records" / "pickle"), "--masks", str(f / "masks"), "--out",
                   o], 2, "not an opendaam record:"),
]


@pytest.mark.parametrize(("argv", "code", "message"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_input_one_line_exit_code_nothing_written(files, tmp_path, capsys, argv, code, message):
    out = tmp_path / "out"
    assert main(argv(files, str(out))) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("opendaam "), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_read_only_out_exits_1_in_one_line(files, tmp_path, capsys, monkeypatch):
    import opendaam.cli._checks as checks

    monkeypatch.setattr(checks.os, "access", lambda path, mode: False)  # as a non-root user in a read-only folder
    out = tmp_path / "ro" / "out"
    assert main(gen(files, "--out", str(out))) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"opendaam generate: error: --out {out}: this user may not write to {tmp_path}; choose another folder"
    assert not out.exists()


def test_missing_extra_exits_1_with_the_install_line(files, tmp_path, capsys, monkeypatch):
    import opendaam.cli._checks as checks

    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    assert main(["evaluate", "--records", str(files / "records"), "--masks", str(files / "masks"),
                 "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == ("opendaam evaluate: error: opendaam evaluate needs matplotlib (plots): "
                                               "pip install 'opendaam[eval]'")
    assert main(["experiment", "thesis", "--out", str(out)]) == 1
    assert "pip install 'opendaam[eval]'" in capsys.readouterr().err
    monkeypatch.setattr(checks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "datasets" else real(name, *a))
    assert main(["experiment", "segmenter", "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        "opendaam experiment: error: opendaam experiment segmenter needs datasets (the Hugging Face export): "
        "pip install 'opendaam[huggingface]'")
    assert not out.exists()


BLOCK = """\
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"matplotlib", "pycocotools", "datasets", "accelerate"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
import importlib.util
_real = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in {
    "matplotlib", "pycocotools", "datasets", "accelerate"} else _real(name, *a)
from opendaam.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_plain_install_never_ends_in_a_traceback(files, tmp_path):
    """Every subcommand with the optional packages made unimportable: a clear line or success (pyyaml is not
    blocked: transformers, a core dependency, installs it)."""
    spec = tmp_path / "s.yaml"
    spec.write_text("classes:\n  - name: car\n    prompts: ['a {}']\n")
    toml = tmp_path / "s.toml"
    toml.write_text(f'model = "{files / "tiny"}"\nsteps = 1\n[[classes]]\nname = "car"\nprompts = ["a {{}}"]\n')
    runs = {
        ("evaluate", "--records", str(files / "records"), "--masks", str(files / "masks"), "--out",
         str(tmp_path / "e")): (1, "pip install 'opendaam[eval]'"),
        ("experiment", "thesis", "--out", str(tmp_path / "x")): (1, "pip install 'opendaam[eval]'"),
        ("experiment", "segmenter", "--out", str(tmp_path / "s")): (1, "'opendaam[huggingface]'"),
        ("dataset", "check", str(spec)): (1, "pycocotools (the COCO export): pip install 'opendaam[dataset]'"),
        ("dataset", "generate", str(spec), "--out", str(tmp_path / "d")): (1, "pip install 'opendaam[dataset]'"),
        ("dataset", "generate", str(toml), "--out", str(tmp_path / "t")): (1, "pycocotools (the COCO export)"),
        ("generate", "a red car", "--model", str(files / "tiny"), "--steps", "1", "--out",
         str(tmp_path / "g")): (0, ""),
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for argv, (code, message) in runs.items():
        proc = subprocess.run([sys.executable, "-c", BLOCK, *argv], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == code, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr and message in proc.stderr, (argv, proc.stderr)
    assert not (tmp_path / "d").exists() and not (tmp_path / "t").exists()


def test_optimize_trains_only_on_records_of_its_class(files, tmp_path):
    records, masks = tmp_path / "records", tmp_path / "masks"
    masks.mkdir()
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    for name, prompt in (("car_0", "a red car"), ("car_1", "a red car"), ("person_0", "a person on a street"),
                         ("person_1", "a person on a street")):
        assert main(gen(files, "--seed", name[-1], "--out", str(records / name), prompt=prompt)) == 0
        Image.fromarray(mask).save(masks / f"{name}.png")
    token = tmp_path / "person.safetensors"
    assert main(["optimize", "--records", str(records), "--masks", str(masks), "--class", "person", "--epochs", "2",
                 "--out", str(token)]) == 0
    from opendaam.optimize import load_token

    assert load_token(token).meta["train_images"] == ["person_0", "person_1"]


def test_open_vocab_maps_a_token_beside_words(files, tmp_path):
    out = tmp_path / "g"
    assert main(gen(files, "--method", "open_vocab", "--words", "car", "--token", str(files / "ov.safetensors"),
                    "--out", str(out))) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [(w["word"], w["file"]) for w in summary["words"]] == [("car", "car"), ("car", "car_token")]
    word, token = np.load(out / "maps" / "car.npy"), np.load(out / "maps" / "car_token.npy")
    assert word.shape == token.shape == (16, 16) and not np.array_equal(word, token)


def test_library_output_is_silenced_by_default_and_shown_with_verbose(files, tmp_path, capsys):
    import diffusers.utils.logging as dlog

    from opendaam.cli import set_verbosity

    try:
        assert main(gen(files, "--out", str(tmp_path / "quiet"))) == 0
        err = capsys.readouterr().err
        assert "Loading pipeline components" not in err and "it/s" not in err, err
        assert dlog.get_verbosity() == dlog.ERROR
        assert main([*gen(files, "--out", str(tmp_path / "loud")), "-v"]) == 0
        err = capsys.readouterr().err
        assert "Loading pipeline components" in err and dlog.get_verbosity() == dlog.WARNING
        assert main(["-q", "toyworld", "render", "--seed", "1", "--out", str(tmp_path / "r")]) == 0
        assert dlog.get_verbosity() == dlog.ERROR
    finally:
        set_verbosity(0)
