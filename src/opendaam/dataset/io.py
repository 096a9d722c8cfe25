"""A dataset folder's files: crash-safe writing (atomic files, append-only manifests, deterministic PNG and NPZ
bytes), the item file layout and reading the manifests; generation, merging and export all use it.

Every file is written to a hidden temporary name in its folder and renamed over the final name
(``os.replace``), so a reader (or a rerun) sees either the old file, the whole new file, or nothing; a
``kill -9`` leaves at most a hidden ``.*.tmp`` file, which :func:`remove_temp_files` clears. Manifest
lines are appended with one ``write`` after the item's files exist; a torn last line (a kill during that
write) is dropped on reading.
"""

from __future__ import annotations

import errno
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from opendaam._io import atomic_write_with

__all__ = [
    "TIMING_KEY",
    "DatasetError",
    "WriteError",
    "append_line",
    "atomic_write",
    "finished_items",
    "inside",
    "item_files",
    "npz_bytes",
    "png_bytes",
    "read_manifest",
    "read_npz",
    "remove_temp_files",
]


class DatasetError(ValueError):
    """A dataset cannot be generated, merged or exported as asked; the message says why and what to do."""


class WriteError(DatasetError):
    """Writing a dataset file failed (permissions, full disk, ...); nothing half-written was left behind."""


def _explain(path: Path, error: OSError) -> WriteError:
    """A :class:`WriteError` with a message a user can act on."""
    reason = error.strerror or str(error)
    hint = ""
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = "; check that you may write to this folder (or choose another --out)"
    elif error.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "; free some space and rerun the same command: finished items are kept"
    return WriteError(f"cannot write {path}: {reason}{hint}")


def inside(root: str | Path, path: str | Path) -> Path:
    """``path`` (absolute, or relative to ``root``) resolved, checked to stay inside ``root``.

    Raises:
        DatasetError: the path leads outside ``root`` (``..``, an absolute path elsewhere, a symlink out).

    Examples:
        >>> inside("/data/set", "images/000001.png").as_posix()
        '/data/set/images/000001.png'
        >>> inside("/data/set", "../x.png")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        opendaam.dataset.io.DatasetError: ../x.png leads outside the dataset folder /data/set; ...
    """
    base = Path(root).resolve()
    target = (base / path).resolve()
    if target != base and base not in target.parents:
        raise DatasetError(f"{path} leads outside the dataset folder {root}; opendaam writes only inside it")
    return target


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Raises:
        WriteError: the folder cannot be written (the temporary file is removed, ``path`` is untouched).

    Examples:
        >>> import os, tempfile
        >>> path = atomic_write(os.path.join(tempfile.mkdtemp(), "a", "x.txt"), "hello")
        >>> path.read_text(), sorted(os.listdir(path.parent))
        ('hello', ['x.txt'])
    """
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    try:  # ".tmp" at the end, so that remove_temp_files finds what a killed writer left
        return atomic_write_with(path, lambda tmp: tmp.write_bytes(payload), suffix=".tmp")
    except OSError as error:
        raise _explain(path, error) from error


def append_line(path: str | Path, record: dict) -> None:
    """Append one JSON object as one line, in a single ``write`` on an append-mode descriptor.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
        >>> append_line(path, {"index": 0}); append_line(path, {"index": 1})
        >>> read_manifest(path)
        [{'index': 0}, {'index': 1}]
    """
    path = Path(path)
    line = (json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n").encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as error:
        raise _explain(path, error) from error
    if written != len(line):  # a short write: the torn line is dropped on reading, then rewritten
        raise WriteError(f"cannot write {path}: only {written} of {len(line)} bytes were written")


def read_manifest(path: str | Path) -> list[dict]:
    """The complete lines of a JSON-lines manifest; a torn last line (no newline or bad JSON) is skipped.

    Raises:
        DatasetError: a line other than the last is not valid JSON (the file was edited or corrupted).

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "m.jsonl")
        >>> _ = open(path, "w").write('{"index": 0}\\n{"ind')
        >>> read_manifest(path)
        [{'index': 0}]
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    entries = []
    for number, line in enumerate(lines[:-1], start=1):  # the part after the last newline is torn or empty
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}, line {number} is not valid JSON ({error.msg}); the manifest was "
                               "edited or corrupted by something other than opendaam") from None
    return entries


def png_bytes(array: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    """PNG bytes of a ``uint8`` ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` array (the same array always gives the
    same bytes).

    With a ``(256, 3)`` ``palette`` a label map is written as a palette image: its values stay the ids (reading
    it gives them back) and viewers show the palette's colours instead of near-black greys.

    Examples:
        >>> data = png_bytes(np.array([[0, 255]], dtype=np.uint8))
        >>> np.asarray(Image.open(io.BytesIO(data))).tolist()
        [[0, 255]]
        >>> palette = np.zeros((256, 3), np.uint8); palette[1] = (0, 0, 142)
        >>> image = Image.open(io.BytesIO(png_bytes(np.array([[1, 0]], np.uint8), palette)))
        >>> image.mode, np.asarray(image).tolist(), image.convert("RGB").getpixel((0, 0))
        ('P', [[1, 0]], (0, 0, 142))
    """
    if array.dtype != np.uint8:
        raise TypeError(f"PNG arrays must be uint8, not {array.dtype}")
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    if palette is not None:
        image = image.convert("P") if image.mode != "P" else image
        image.putpalette(np.asarray(palette, dtype=np.uint8).reshape(-1).tolist())
    image.save(buffer, format="PNG")
    return buffer.getvalue()


_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed zip timestamps: the same arrays give the same bytes


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """A compressed ``.npz`` (readable by ``np.load``, no pickle) with fixed timestamps, so it is reproducible.

    Examples:
        >>> data = npz_bytes({"car": np.ones((2, 2), np.float16)})
        >>> data == npz_bytes({"car": np.ones((2, 2), np.float16)}), read_npz(data)["car"].dtype
        (True, dtype('float16'))
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w") as handle:
                np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def read_npz(source: str | Path | bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file or bytes, loaded without pickle.

    Examples:
        >>> read_npz(npz_bytes({"a": np.arange(3)}))["a"].tolist()
        [0, 1, 2]
    """
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    with np.load(handle, allow_pickle=False) as data:
        return {name: data[name] for name in data.files}


def remove_temp_files(folder: str | Path) -> int:
    """Delete the hidden ``.*.tmp`` files that killed writers left under ``folder``; returns how many.

    Only call this when no writer is running on the folder.

    Examples:
        >>> import os, tempfile
        >>> root = tempfile.mkdtemp(); _ = open(os.path.join(root, ".x.png.abc.tmp"), "w")
        >>> remove_temp_files(root), os.listdir(root)
        (1, [])
    """
    count = 0
    for path in Path(folder).rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            count += 1
    return count


TIMING_KEY = "timing"
"""Manifest field holding wall times: the only field that differs between two runs of the same spec."""


def item_files(key: str) -> dict[str, str]:
    """Relative paths of an item's files.

    Examples:
        >>> item_files("000003")["label"]
        'labels/000003.png'
    """
    return {"image": f"images/{key}.png", "label": f"labels/{key}.png", "maps": f"maps/{key}.npz"}


def finished_items(out: Path, digest: str) -> dict[int, dict]:
    """Manifest entries (by index) of items finished for the spec with hash ``digest``, across all shard
    manifests, whose files all exist.

    Examples:
        >>> finished_items(Path("no-such-folder"), "abc")
        {}
    """
    done: dict[int, dict] = {}
    folder = out / "shards"
    if not folder.exists():
        return done
    for path in sorted(folder.glob("manifest-*.jsonl")):
        for entry in read_manifest(path):
            if entry.get("provenance", {}).get("spec_hash") != digest:
                continue
            if all((out / rel).exists() for rel in entry["files"].values()):
                done.setdefault(int(entry["index"]), entry)
    return done
