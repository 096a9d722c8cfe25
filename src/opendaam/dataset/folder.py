"""Which files of a dataset folder opendaam wrote, and who may write the folder.

opendaam deletes and replaces only its own files. They are recognised by name and by record, never by a
loose pattern:

* top level: ``dataset.json``, ``spec.*``, ``manifest.jsonl``, ``dropped.jsonl``, ``exports.json``,
  ``README.md``, and hidden lock, temporary and staging files (``.opendaam*``, ``.*.tmp``);
* ``images/<key>.png``, ``labels/<key>.png``, ``maps/<key>.npz``, where ``key`` is six digits (an item's
  index: a spec has at most a million items), so ``images/000123_notes.txt`` or ``images/beach.jpg`` are not
  opendaam's but ``images/000123.png`` is;
* ``shards/manifest-<r>-of-<n>.jsonl``;
* export files (``cityscapes/``, ``coco/``, ``huggingface/``) listed in ``exports.json``.

Any other file inside those folders is the user's: every writer refuses to run while one is there, naming
a few, so no rerun, ``--force`` or re-export can delete it.

One writer at a time: generation and merging hold an advisory lock file in the dataset folder
(:func:`dataset_lock`); the shards of one sharded run each hold their own and may run together.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

from opendaam._io import LockError, folder_lock, lock_holder, lock_is_held
from opendaam.dataset.io import DatasetError

__all__ = [
    "EXPORT_FOLDERS",
    "ITEM_FOLDERS",
    "MANAGED_FOLDERS",
    "TOP_LEVEL_FILES",
    "dataset_lock",
    "foreign_files",
    "listed_exports",
    "refuse_foreign_files",
]

ITEM_FOLDERS = {"images": ".png", "labels": ".png", "maps": ".npz"}
"""Folders of per-item files and the suffix of their files."""
EXPORT_FOLDERS = ("cityscapes", "coco", "huggingface")
"""Export folders, replaced as a whole when the exports are written again."""
MANAGED_FOLDERS = (*ITEM_FOLDERS, "shards", *EXPORT_FOLDERS)
"""Folders whose files opendaam deletes or replaces."""
TOP_LEVEL_FILES = ("dataset.json", "spec.yaml", "spec.yml", "spec.toml", "manifest.jsonl", "dropped.jsonl",
                   "exports.json", "README.md")
"""Files opendaam writes at the top of a dataset folder."""

_KEY = re.compile(r"\d{6}")
_SHARD_MANIFEST = re.compile(r"manifest-\d{5}-of-\d{5}\.jsonl")
_SINGLE_LOCK = ".opendaam.lock"


def _hidden_own(name: str) -> bool:
    """Hidden files opendaam makes: temporary files of atomic writes, locks, staging folders."""
    return name.startswith(".opendaam") or (name.startswith(".") and name.endswith(".tmp"))


def listed_exports(out: Path) -> set[str]:
    """Relative paths of the export files ``exports.json`` lists (empty when there is none).

    Examples:
        >>> listed_exports(Path("no-such-folder"))
        set()
    """
    try:
        data = json.loads((out / "exports.json").read_text())
    except (OSError, ValueError):
        return set()
    files = data.get("files", []) if isinstance(data, dict) else []
    return {f for f in files if isinstance(f, str)}


def foreign_files(out: str | Path) -> list[str]:
    """Files inside the folders opendaam manages that opendaam did not write (relative paths, sorted).

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> (out / "images").mkdir(); _ = (out / "images" / "000000.png").write_bytes(b"")
        >>> _ = (out / "images" / "20230615_beach.jpg").write_bytes(b"")
        >>> foreign_files(out)
        ['images/20230615_beach.jpg']
    """
    out = Path(out)
    exports = None
    found = []
    for folder in MANAGED_FOLDERS:
        root = out / folder
        if not root.exists():
            continue
        if root.is_symlink() or not root.is_dir():  # a link would lead writes out of the dataset folder
            found.append(folder)
            continue
        for path in sorted(root.rglob("*")):
            if path.is_dir() and not path.is_symlink():
                continue
            rel = path.relative_to(out).as_posix()
            if _hidden_own(path.name) and not path.is_symlink():
                continue
            if folder in ITEM_FOLDERS:
                ok = path.parent == root and path.suffix == ITEM_FOLDERS[folder] and bool(_KEY.fullmatch(path.stem))
            elif folder == "shards":
                ok = path.parent == root and bool(_SHARD_MANIFEST.fullmatch(path.name))
            else:
                if exports is None:
                    exports = listed_exports(out)
                ok = rel in exports
            if not ok or path.is_symlink():
                found.append(rel)
    return found


def refuse_foreign_files(out: str | Path) -> None:
    """Raise when :func:`foreign_files` finds any, naming a few.

    Raises:
        DatasetError: files opendaam did not write are inside the folders it manages.

    Examples:
        >>> import tempfile
        >>> refuse_foreign_files(tempfile.mkdtemp())
    """
    found = foreign_files(out)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise DatasetError(f"{out} holds files opendaam did not write inside the folders it manages ({shown}); "
                           "move them out of the dataset folder, then rerun (opendaam replaces those folders "
                           "and would delete them)")


def _lock_name(rank: int, world: int) -> str:
    """Lock file name of one writer: the whole folder, or one shard of a sharded run."""
    return _SINGLE_LOCK if world == 1 else f".opendaam-shard-{rank:05d}-of-{world:05d}.lock"


@contextlib.contextmanager
def dataset_lock(out: str | Path, rank: int = 0, world: int = 1, what: str = "opendaam dataset",
                 others_done: bool = False) -> Iterator[Path]:
    """Hold the dataset folder's writer lock for a block.

    A single process (``world == 1``) and ``merge`` lock the whole folder: no shard may be running. A
    shard ``rank`` of ``world`` locks its own share: shards of the same run may run together, a second
    process for the same shard, a run with another world size, or a whole-folder writer is refused.

    Args:
        out: the dataset folder (created when missing).
        rank: this process' shard.
        world: number of shards (1: the whole folder).
        what: what the holder does, written into the lock file.
        others_done: skip the check of the other shards' locks (they passed a barrier and are exiting).

    Raises:
        opendaam._io.LockError: another live process writes the folder; the message names it.

    Examples:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> with dataset_lock(out):
        ...     sorted(p.name for p in out.iterdir())
        ['.opendaam.lock']
    """
    out = Path(out)
    name = _lock_name(rank, world)
    with folder_lock(out / name, what) as path:
        if not others_done:
            for other in sorted(out.glob(".opendaam*.lock")):
                if other.name == name:
                    continue
                same_run = world > 1 and other.name != _SINGLE_LOCK and other.name.endswith(f"-of-{world:05d}.lock")
                if not same_run and lock_is_held(other):
                    info = lock_holder(other) or {}
                    who = f"process {info['pid']} on host {info.get('host', '?')}" if "pid" in info else \
                        "another process"
                    raise LockError(f"{out} is being written by {who} (lock file {other}); wait for it to finish "
                                    "or stop it, then rerun")
        yield path
