"""A dataset folder is never lost or clobbered: foreign files survive --force, paths stay inside the folder,
one writer at a time (stale locks taken over), exports appear all at once, files follow the umask, two
Hugging Face exports do not collide, specs that cannot be generated are refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from opendaam._io import LockError, atomic_write_with, folder_lock, lock_holder
from opendaam.cli import dataset as dataset_cli
from opendaam.dataset import DatasetError, SpecError, finalize, generate, load_spec, parse_spec
from opendaam.dataset.folder import dataset_lock, foreign_files
from opendaam.dataset.generate import current_shard
from opendaam.models import build_pipeline

SPEC = """\
name: safety
model: {model}
steps: 1
height: 32
width: 32
seeds: {seeds}
classes:
  - name: car
    prompts: ["a {{}} on a street"]
  - name: person
    prompts: ["a {{}} in a park"]
outputs: {{formats: [cityscapes, coco]}}
filter: {{min_confidence: 0.8}}  # drops the two car items of a.yaml (confidence 0.78, 0.79)
"""


def cli(*argv: str) -> int:
    """``opendaam dataset ...`` in this process."""
    import argparse

    parser = argparse.ArgumentParser()
    dataset_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["dataset", *argv])
    return args.run(args)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    build_pipeline("tiny", seed=0).save_pretrained(root / "tiny")
    (root / "a.yaml").write_text(SPEC.format(model="tiny", seeds="[0, 1]"))
    (root / "b.yaml").write_text(SPEC.format(model="tiny", seeds="[5]"))
    assert cli("generate", str(root / "a.yaml"), "--out", str(root / "ref"), "--threads", "1", "--no-progress") == 0
    return root


def copy_dataset(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


FOREIGN = ["images/20230615_beach.jpg", "images/000123_notes.txt", "labels/mine.png", "maps/readme.md",
           "shards/notes.txt", "coco/mynotes.txt", "cityscapes/readme.txt", "cityscapes/gtFine/train/x.txt",
           "huggingface/mine.txt"]


@pytest.mark.parametrize("rel", FOREIGN)
def test_force_refuses_and_keeps_foreign_files_in_every_subfolder(root, tmp_path, rel):
    out = copy_dataset(root / "ref", tmp_path / "d")
    (out / rel).parent.mkdir(parents=True, exist_ok=True)
    (out / rel).write_text("the user's own")
    before = tree(out)
    with pytest.raises(DatasetError, match=f"files opendaam did not write .*{rel}"):
        cli("generate", str(root / "b.yaml"), "--out", str(out), "--force", "--no-progress")
    with pytest.raises(DatasetError, match=rel):  # a rerun of the same spec re-exports: also refused
        cli("generate", str(root / "a.yaml"), "--out", str(out), "--no-progress")
    with pytest.raises(DatasetError, match=rel):
        cli("merge", str(out))
    assert tree(out) == before  # nothing deleted, nothing written


def test_force_regenerates_own_files_and_keeps_top_level_foreign_files(root, tmp_path):
    out = copy_dataset(root / "ref", tmp_path / "d")
    (out / "notes.txt").write_text("mine")
    assert cli("generate", str(root / "b.yaml"), "--out", str(out), "--force", "--threads", "1",
               "--no-progress") == 0
    assert (out / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "fresh"
    assert cli("generate", str(root / "b.yaml"), "--out", str(fresh), "--threads", "1", "--no-progress") == 0
    mine = {k: v for k, v in tree(out).items() if k != "notes.txt" and "shards" not in k}
    theirs = {k: v for k, v in tree(fresh).items() if "shards" not in k}
    assert sorted(mine) == sorted(theirs)  # the old spec's items and exports are gone, nothing else
    assert mine["labels/000000.png"] == theirs["labels/000000.png"]


def test_force_beside_other_files_but_never_over_them(root, tmp_path):
    out = tmp_path / "userdir"
    out.mkdir()
    (out / "photo.jpg").write_bytes(b"jpeg")
    with pytest.raises(DatasetError, match=r"not empty and holds no opendaam dataset \(found photo.jpg\)"):
        cli("generate", str(root / "b.yaml"), "--out", str(out), "--no-progress")
    (out / "README.md").write_text("my readme")
    with pytest.raises(DatasetError, match="even with --force opendaam does not overwrite them"):
        cli("generate", str(root / "b.yaml"), "--out", str(out), "--force", "--no-progress")
    (out / "README.md").unlink()
    assert cli("generate", str(root / "b.yaml"), "--out", str(out), "--force", "--threads", "1",
               "--no-progress") == 0
    assert (out / "photo.jpg").read_bytes() == b"jpeg" and (out / "manifest.jsonl").exists()


@pytest.mark.parametrize(("outputs", "key"), [
    ({"split": "/abs/path"}, "outputs.split"), ({"split": "../../x"}, "outputs.split"),
    ({"split": "a/b"}, "outputs.split"), ({"split": ""}, "outputs.split"), ({"city": "../up"}, "outputs.city"),
    ({"city": "/tmp/x"}, "outputs.city"),
])
def test_output_names_that_leave_the_folder_are_refused(root, tmp_path, outputs, key):
    data = {"classes": [{"name": "car", "prompts": ["a {}"]}], "outputs": outputs}
    with pytest.raises(SpecError, match=f"spec key '{key}'"):
        parse_spec(data)
    spec = tmp_path / "s.toml"
    value = next(iter(outputs.values()))
    spec.write_text(f'[[classes]]\nname = "car"\nprompts = ["a {{}}"]\n[outputs]\n{next(iter(outputs))} = "{value}"\n')
    with pytest.raises(SpecError, match=key):
        cli("check", str(spec))


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "c\\d", "tab\there"])
def test_class_names_that_cannot_name_files_are_refused(name):
    with pytest.raises(SpecError, match=r"classes\[0\].name"):
        parse_spec({"classes": [{"name": name}], "prompts": [f"a {{{name}}}"]})


def test_exports_check_every_path_even_without_the_spec(root, tmp_path):
    from opendaam.dataset.export import export_cityscapes, export_coco

    entries = [json.loads(line) for line in (root / "ref" / "manifest.jsonl").read_text().splitlines()]
    classes = json.loads((root / "ref" / "dataset.json").read_text())["classes"]
    dest = tmp_path / "deep" / "dest"
    dest.mkdir(parents=True)
    with pytest.raises(DatasetError, match="leads outside"):
        export_cityscapes(root / "ref", entries, classes, city="x", split="../../..", dest=dest)
    with pytest.raises(DatasetError, match="leads outside"):
        export_coco(root / "ref", entries, classes, split="x/../../../../y", dest=dest)
    bad = [dict(entries[0], files={**entries[0]["files"], "label": "../../etc/passwd"})]
    with pytest.raises(DatasetError, match="leads outside"):
        export_coco(root / "ref", bad, classes, dest=dest)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


HOLD = """\
import sys, time
from opendaam.dataset.folder import dataset_lock
with dataset_lock(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), what="test holder"):
    print("locked", flush=True)
    time.sleep(120)
"""


def hold(out: Path, rank: int = 0, world: int = 1) -> subprocess.Popen:
    """A process holding the dataset lock (released when it exits or is killed)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(rank), str(world)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(root, tmp_path):
    import socket

    out = copy_dataset(root / "ref", tmp_path / "d")
    proc = hold(out)
    try:
        with pytest.raises(LockError, match=f"being written by process {proc.pid} on host {socket.gethostname()}, "
                                            "running test holder"):
            cli("generate", str(root / "a.yaml"), "--out", str(out), "--no-progress")
        with pytest.raises(LockError, match=str(proc.pid)):
            finalize(out)
        with pytest.raises(LockError, match=str(proc.pid)):  # a shard may not run beside a whole-folder writer
            generate(load_spec(root / "a.yaml"), out, shard=current_shard(0, 2), progress=False)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lock_holder(out / ".opendaam.lock")["pid"] == proc.pid  # the dead holder's file is still there
    assert cli("generate", str(root / "a.yaml"), "--out", str(out), "--no-progress") == 0  # taken over
    assert not (out / ".opendaam.lock").exists()


def test_shards_lock_their_own_share(tmp_path):
    proc = hold(tmp_path, 0, 2)
    try:
        with dataset_lock(tmp_path, 1, 2):  # the other shard of the same run may run beside it
            pass
        with pytest.raises(LockError, match=str(proc.pid)):  # the same shard twice may not
            with dataset_lock(tmp_path, 0, 2):
                pass
        with pytest.raises(LockError, match=str(proc.pid)):  # nor a run with another world size
            with dataset_lock(tmp_path, 1, 3):
                pass
        with pytest.raises(LockError, match=str(proc.pid)):  # nor merge or a single process
            with dataset_lock(tmp_path):
                pass
    finally:
        proc.kill()
        proc.wait()


def test_lock_file_names_holder_and_is_removed():
    import tempfile

    lock = Path(tempfile.mkdtemp()) / ".x.lock"
    with folder_lock(lock, "job"):
        info = lock_holder(lock)
        assert info["pid"] == os.getpid() and info["what"] == "job" and info["host"]
    assert not lock.exists()


def expected_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_records_tokens_and_safetensors_writers_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from opendaam.optimize import OptimizedToken

    path = atomic_write_with(tmp_path / "x.safetensors", lambda tmp: save_file({"a": torch.zeros(1)}, str(tmp)))
    token = OptimizedToken(torch.zeros(1, 4), "car", {"text_dim": 4}).save(tmp_path / "t.safetensors")
    for p in (path, token):
        assert p.stat().st_mode & 0o777 == expected_mode()


def test_a_failed_export_leaves_no_manifest_or_card_and_a_rerun_completes(root, tmp_path, monkeypatch):
    import opendaam.dataset.export as export

    out = copy_dataset(root / "ref", tmp_path / "d")
    (out / "manifest.jsonl").unlink()
    (out / "README.md").unlink()
    old_cityscapes = {k: v for k, v in tree(out).items() if k.startswith("cityscapes/")}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill would, after the cityscapes export was staged

    monkeypatch.setattr(export, "export_coco", crash)
    with pytest.raises(KeyboardInterrupt):
        finalize(out)
    monkeypatch.undo()
    assert not (out / "manifest.jsonl").exists() and not (out / "README.md").exists()
    assert {k: v for k, v in tree(out).items() if k.startswith("cityscapes/")} == old_cityscapes
    assert foreign_files(out) == []  # the staging folder is opendaam's (hidden), cleaned by the next merge
    assert cli("merge", str(out)) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".opendaam")]
    ref = {k: v for k, v in tree(root / "ref").items() if not k.startswith("shards/")}
    got = {k: v for k, v in tree(out).items() if not k.startswith("shards/")}
    assert sorted(ref) == sorted(got)
    assert all(ref[k] == got[k] for k in ref if k != "manifest.jsonl")


def test_generate_prints_the_count_the_filters_kept(root, capsys):
    assert cli("generate", str(root / "a.yaml"), "--out", str(root / "ref"), "--no-progress") == 0
    dropped = (root / "ref" / "dropped.jsonl").read_text().splitlines()
    assert dropped, "the filter dropped nothing: the test cannot tell kept from total"
    assert f"the filters kept {4 - len(dropped)} of 4 items" in capsys.readouterr().out


def test_two_huggingface_exports_load_their_own_rows_from_one_cache(root, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    loaded = {}
    for name, seeds in (("a", "[0]"), ("b", "[7]")):
        (tmp_path / f"{name}.yaml").write_text(SPEC.format(model=str(root / "tiny"), seeds=seeds).replace(
            "formats: [cityscapes, coco]", "formats: [huggingface]"))
        out = tmp_path / name / "dataset"
        assert generate(load_spec(tmp_path / f"{name}.yaml"), out, threads=1, progress=False).finalized
        rows = datasets.load_dataset(str(out / "huggingface"), cache_dir=str(tmp_path / "cache"))["train"]
        loaded[name] = [(r["seed"], np.asarray(r["label"]).tobytes()) for r in rows]
        manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
        dropped = {json.loads(line)["index"] for line in (out / "dropped.jsonl").read_text().splitlines()}
        assert [s for s, _ in loaded[name]] == [e["seed"] for e in manifest if e["index"] not in dropped]
    assert {s for s, _ in loaded["a"]} == {0} and {s for s, _ in loaded["b"]} == {7}


@pytest.mark.parametrize(("body", "message"), [
    ("seeds: [-1]", "seed -1 is outside the valid range 0 .. 9223372036854775807"),
    ("seeds: [18446744073709551615]", "seed 18446744073709551615 is outside the valid range"),
    ("seeds: {start: 9223372036854775807, count: 2}", "leave the valid range"),
    ("seeds: {start: 0, count: 1000000000}", "more than the 1000000 one spec may have"),
    ("guidance: -5", "expected a number >= 0"),
    ("scheduler: fancy", "unknown scheduler 'fancy'; choose one of: pndm"),
])
def test_spec_values_refused_by_check(tmp_path, body, message):
    spec = tmp_path / "s.yaml"
    spec.write_text("classes:\n  - name: car\n    prompts: ['a {}']\n" + body + "\n")
    with pytest.raises(SpecError, match=message):
        cli("check", str(spec))
    with pytest.raises(SpecError, match=message):
        cli("generate", str(spec), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("body", "error", "message"), [
    ("height: 60", ValueError, "height 60 is not a multiple of 8"),
    ("model: no-such-model-folder", FileNotFoundError, "no such folder, bundled model"),
    ("prompts: ['{car} " + "very " * 80 + "long']", ValueError, "tokens but the text encoder reads at most 77"),
    ("classes:\n  - name: car\n    token: plain.txt\nmethod: linear\nprompts: ['a {car}']",
     SpecError, "plain.txt is not an opendaam token file"),
])
def test_spec_checked_against_the_model_before_anything_is_written(root, tmp_path, body, error, message):
    (tmp_path / "plain.txt").write_text("not a token")
    (tmp_path / "tiny").symlink_to(root / "tiny")
    base = "model: tiny\n" if "model:" not in body else ""
    classes = "" if "classes:" in body else "classes:\n  - name: car\n    prompts: ['a {}']\n"
    spec = tmp_path / "s.yaml"
    spec.write_text(base + classes + body + "\n")
    with pytest.raises(error, match=message):
        cli("check", str(spec))
    with pytest.raises(error, match=message):
        cli("generate", str(spec), "--out", str(tmp_path / "out"), "--no-progress")
    assert not (tmp_path / "out").exists()  # no dataset.json, no spec.yaml, no folder


def test_accelerate_starting_one_process_for_several_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DatasetError, match="accelerate launch --multi_gpu --num_processes N"):
        current_shard()


def test_init_writes_an_example_that_checks(tmp_path, capsys):
    target = tmp_path / "mine.yaml"
    assert cli("init", str(target)) == 0
    assert "thesis-toy-urban" in target.read_text()
    assert cli("check", str(target)) == 0
    assert "200 items" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exists; choose a new file name"):
        cli("init", str(target), "--example", "urban_multiclass")


def test_check_reports_missing_extras(tmp_path, monkeypatch, capsys):
    import opendaam.cli._checks as checks

    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec",
                        lambda name, *a: None if name == "pycocotools" else real(name, *a))
    spec = tmp_path / "s.toml"
    spec.write_text(textwrap.dedent("""\
        [[classes]]
        name = "car"
        prompts = ["a {}"]
        [outputs]
        formats = ["coco"]
        """))
    assert cli("check", str(spec)) == 1
    assert "pycocotools (the COCO export): pip install 'opendaam[dataset]'" in capsys.readouterr().err
    from opendaam.cli._checks import MissingExtra

    with pytest.raises(MissingExtra, match=r"pip install 'opendaam\[dataset\]'"):
        cli("generate", str(spec), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
