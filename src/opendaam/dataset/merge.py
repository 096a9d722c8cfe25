"""Join shard manifests into one, filter items, write the exports and the dataset card.

:func:`finalize` only reads the dataset folder (``dataset.json``, shard manifests, item files), so it
runs the same after one process, after ``N`` shards (``opendaam dataset merge DIR``) or again after the
filters or export formats in ``dataset.json`` changed. Everything it writes is a pure function of those
files, so the result of ``N`` shards equals that of one process.

Crash consistency: ``manifest.jsonl`` and the card ``README.md`` are removed first and written last, and
the exports are built in a hidden staging folder and renamed into place; a reader who sees the manifest
and the card sees complete exports, and a killed merge is finished by running it again.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from opendaam.dataset.folder import EXPORT_FOLDERS, ITEM_FOLDERS, dataset_lock, listed_exports, refuse_foreign_files
from opendaam.dataset.io import TIMING_KEY, DatasetError, atomic_write, finished_items, read_manifest, remove_temp_files
from opendaam.dataset.spec import DatasetSpec, FilterSpec, expand_items, parse_spec

__all__ = ["FinalizeResult", "filter_items", "finalize", "load_dataset", "write_card"]

_STAGING = ".opendaam-staging"
_OLD = ".opendaam-old-"


def load_dataset(out: str | Path) -> tuple[dict, DatasetSpec]:
    """The ``dataset.json`` header of a dataset folder and its spec.

    Raises:
        DatasetError: the folder holds no opendaam dataset.
    """
    path = Path(out) / "dataset.json"
    if not path.exists():
        raise DatasetError(f"{out} holds no opendaam dataset (no dataset.json); make one with "
                           "`opendaam dataset generate SPEC --out DIR`")
    header = json.loads(path.read_text())
    return header, parse_spec(header["spec"], base_dir=out)


def filter_items(entries: Sequence[dict], rules: FilterSpec) -> dict[int, list[str]]:
    """Reasons to drop items (by index): a class' mask area outside that class' percentile band over the
    dataset's items that prompt it, or a mask confidence below ``min_confidence``.

    Examples:
        >>> entries = [{"index": i, "masks": [{"class": "car", "area": a, "confidence": 0.9}]}
        ...            for i, a in enumerate([0.0, 0.1, 0.2, 0.3, 0.9])]
        >>> for index, why in filter_items(entries, FilterSpec(area_percentiles=(10, 90))).items():
        ...     print(index, why)
        0 ['car area 0.0000 below the 10th percentile 0.0400']
        4 ['car area 0.9000 above the 90th percentile 0.6600']
    """
    reasons: dict[int, list[str]] = {}
    if rules.area_percentiles is not None:
        low_q, high_q = rules.area_percentiles
        areas: dict[str, list[float]] = {}
        for entry in entries:
            for mask in entry["masks"]:
                areas.setdefault(mask["class"], []).append(mask["area"])
        bands = {name: np.percentile(np.asarray(values, dtype=np.float64), [low_q, high_q])
                 for name, values in areas.items()}
        for entry in entries:
            for mask in entry["masks"]:
                low, high = bands[mask["class"]]
                if mask["area"] < low:
                    reasons.setdefault(entry["index"], []).append(
                        f"{mask['class']} area {mask['area']:.4f} below the {low_q:g}th percentile {low:.4f}")
                elif mask["area"] > high:
                    reasons.setdefault(entry["index"], []).append(
                        f"{mask['class']} area {mask['area']:.4f} above the {high_q:g}th percentile {high:.4f}")
    if rules.min_confidence is not None:
        for entry in entries:
            for mask in entry["masks"]:
                if mask["confidence"] < rules.min_confidence:
                    reasons.setdefault(entry["index"], []).append(
                        f"{mask['class']} confidence {mask['confidence']:.4f} below {rules.min_confidence:g}")
    return dict(sorted(reasons.items()))


def _without_timing(entry: dict) -> dict:
    """A manifest entry without its timing field."""
    return {k: v for k, v in entry.items() if k != TIMING_KEY}


def _merge_entries(out: Path, digest: str, expected: int) -> list[dict]:
    """All finished entries sorted by index; the same index twice must agree (timing aside)."""
    done = finished_items(out, digest)
    for path in sorted((out / "shards").glob("manifest-*.jsonl")) if (out / "shards").exists() else []:
        for entry in read_manifest(path):
            first = done.get(int(entry["index"]))
            if first is not None and entry.get("provenance", {}).get("spec_hash") == digest and \
                    _without_timing(first) != _without_timing(entry):
                raise DatasetError(f"item {entry['index']} was generated twice with different results ({path.name}); "
                                   "the shards ran on different software or hardware")
    missing = [i for i in range(expected) if i not in done]
    if missing:
        shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(f"{len(missing)} of {expected} items are not finished (indices {shown}); rerun "
                           "`opendaam dataset generate` with the same spec and --out (every shard) first")
    return [done[i] for i in range(expected)]


def _remove_stale(out: Path, entries: Sequence[dict], digest: str) -> None:
    """Remove item files no entry lists and shard manifests of other specs (all checked to be opendaam's)."""
    listed = {(out / rel).resolve() for e in entries for rel in e["files"].values()}
    for folder, suffix in ITEM_FOLDERS.items():
        for path in (out / folder).glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]{suffix}") if (out / folder).exists() else []:
            if path.is_file() and path.resolve() not in listed:
                path.unlink()
    for path in (out / "shards").glob("manifest-*.jsonl") if (out / "shards").exists() else []:
        if not any(e.get("provenance", {}).get("spec_hash") == digest for e in read_manifest(path)):
            path.unlink()


def _remove_leftovers(out: Path) -> None:
    """Staging and replaced export folders that a killed merge left (hidden, named by opendaam)."""
    for path in out.iterdir():
        if path.is_dir() and not path.is_symlink() and (path.name.startswith(_STAGING) or
                                                        path.name.startswith(_OLD)):
            shutil.rmtree(path)


def _write_exports_json(out: Path, files: set[str]) -> None:
    """List the export files in ``exports.json`` (what later runs may replace)."""
    atomic_write(out / "exports.json", json.dumps({"files": sorted(files)}, indent=1) + "\n")


def _swap_in(out: Path, staging: Path, written: list[Path]) -> None:
    """Move the staged export folders into place (each one a rename), old ones out and away.

    ``exports.json`` lists the old and the new files while both may exist, then the new ones only.
    """
    new = {p.relative_to(staging).as_posix() for p in written}
    _write_exports_json(out, listed_exports(out) | new)
    for folder in EXPORT_FOLDERS:
        target, staged = out / folder, staging / folder
        old = out / f"{_OLD}{folder}"
        if target.exists():
            os.replace(target, old)
        if staged.exists():
            os.replace(staged, target)
        if old.exists():
            shutil.rmtree(old)
    _write_exports_json(out, new)


class FinalizeResult(dict):
    """Counts of a :func:`finalize` run: ``items``, ``kept``, ``dropped``, ``exports``."""


def finalize(out: str | Path, *, others_done: bool = False) -> FinalizeResult:
    """Merge the shard manifests into ``manifest.jsonl``, apply the filters (``dropped.jsonl``), write the
    exports of ``dataset.json``'s spec and the dataset card ``README.md``; clean leftovers of killed runs.

    Holds the folder's lock: it refuses while a generation process writes the folder.

    Args:
        out: the dataset folder.
        others_done: the other shards passed a barrier and are exiting (do not wait for their locks).

    Raises:
        DatasetError: items are missing (some shard has not finished) or disagree between shards, or
            files opendaam did not write are inside its folders.
        opendaam._io.LockError: another process writes the folder.
    """
    out = Path(out)
    load_dataset(out)  # a folder without a dataset is refused before a lock file is made in it
    with dataset_lock(out, what="opendaam dataset merge", others_done=others_done):
        return _finalize_locked(out)


def _finalize_locked(out: Path) -> FinalizeResult:
    """:func:`finalize` while holding the folder's lock."""
    from opendaam import __version__
    from opendaam.dataset.export import export_cityscapes, export_coco, export_huggingface, safe_city

    header, spec = load_dataset(out)
    refuse_foreign_files(out)
    digest = header["spec_hash"]
    classes = header["classes"]
    items = expand_items(spec)
    entries = _merge_entries(out, digest, len(items))
    manifest = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in entries)
    dropped = filter_items(entries, spec.filter)
    kept = [e for e in entries if e["index"] not in dropped]

    for name in ("README.md", "manifest.jsonl"):  # the card and manifest say "complete": gone until it is
        (out / name).unlink(missing_ok=True)
    _remove_leftovers(out)
    staging = out.resolve() / f"{_STAGING}-{os.getpid()}"  # resolved like the paths the exports return
    staging.mkdir()
    written: list[Path] = []
    formats = list(spec.outputs.formats)
    if "cityscapes" in formats:
        city = safe_city(spec.outputs.city or spec.name)
        written += export_cityscapes(out, kept, classes, city=city, split=spec.outputs.split,
                                     background_id=spec.outputs.background_id, dest=staging)
    if "coco" in formats:
        info = {"description": spec.name, "version": __version__, "spec_hash": digest,
                "url": "https://github.com/opendaam/opendaam"}
        written.append(export_coco(out, kept, classes, split=spec.outputs.split, info=info, dest=staging))
    if "huggingface" in formats:
        written += export_huggingface(out, kept, classes, split=spec.outputs.split, name=spec.name, dest=staging)
    _swap_in(out, staging, written)
    shutil.rmtree(staging)
    atomic_write(out / "dropped.jsonl", "".join(
        json.dumps({"index": i, "key": f"{i:06d}", "reasons": r}, sort_keys=True) + "\n" for i, r in dropped.items()))
    atomic_write(out / "manifest.jsonl", manifest)
    write_card(out, spec, header, entries, dropped)  # last: a card means every export is in place
    _remove_stale(out, entries, digest)
    remove_temp_files(out)
    return FinalizeResult(items=len(entries), kept=len(kept), dropped=len(dropped), exports=formats)


def _class_rows(spec: DatasetSpec, classes: Sequence[dict], entries: Sequence[dict], kept: set[int]) -> list[str]:
    """Markdown rows of the per-class table."""
    total_pixels = sum(sum(m["pixels"] for m in e["masks"]) for e in entries if e["index"] in kept) or 1
    rows = []
    for cls in classes:
        masks = [(e["index"], m) for e in entries for m in e["masks"] if m["class"] == cls["name"]]
        in_kept = [m for i, m in masks if i in kept]
        with_pixels = [m for m in in_kept if m["pixels"] > 0]
        pixels = sum(m["pixels"] for m in in_kept)
        mean_area = np.mean([m["area"] for m in in_kept]) if in_kept else 0.0
        mean_conf = np.mean([m["confidence"] for m in with_pixels]) if with_pixels else 0.0
        cs = cls.get("cityscapes_id")
        rows.append(f"| {cls['id']} | {cls['name']} | {cs if cs is not None else '-'} | {len(masks)} | "
                    f"{len(in_kept)} | "
                    f"{len(with_pixels)} | {pixels / total_pixels:.3f} | {mean_area:.4f} | {mean_conf:.3f} |")
    return rows


def write_card(out: Path, spec: DatasetSpec, header: dict, entries: Sequence[dict],
               dropped: dict[int, list[str]]) -> Path:
    """Write the dataset card ``README.md``: what was generated how, counts, class frequencies, layout."""
    kept = {e["index"] for e in entries} - set(dropped)
    classes = header["classes"]
    provenance = entries[0]["provenance"] if entries else {}
    ignored = np.mean([e["ignored"] for e in entries if e["index"] in kept]) if kept else 0.0
    background = np.mean([e["background"] for e in entries if e["index"] in kept]) if kept else 0.0
    reasons: dict[str, int] = {}
    for why in dropped.values():
        for reason in why:
            kind = "area" if " area " in reason else "confidence"
            reasons[kind] = reasons.get(kind, 0) + 1
    templates = [t for c in spec.classes for t in c.prompts] + list(spec.prompts)
    lines = [
        f"# {spec.name}",
        "",
        "A synthetic semantic segmentation dataset generated with opendaam: images from a text-to-image "
        "diffusion model, labels from its cross-attention maps.",
        "",
        "## Counts",
        "",
        f"- items: {len(entries)} ({len(templates)} prompt templates x {spec.seed_count} seeds)",
        f"- kept by the filters: {len(kept)}; dropped: {len(dropped)}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) + ")" if reasons else ""),
        f"- pixels (kept items): background {background:.3f}, ignored {ignored:.3f}",
        "",
        "## Classes",
        "",
        "Pixel share is over the labelled (class) pixels of kept items; confidence is the mean normalized map "
        "value inside a mask.",
        "",
        "| id | class | Cityscapes id | images (all) | images (kept) | with mask | pixel share | mean area | "
        "mean confidence |",
        "|---|---|---|---|---|---|---|---|---|",
        *_class_rows(spec, classes, entries, kept),
        "",
        "## How it was made",
        "",
        f"- model: `{provenance.get('model', spec.model_spec.id)}`"
        + (f" (revision `{provenance['revision']}`)" if provenance.get("revision") else "")
        + (f" (commit `{provenance['model_commit']}`)" if provenance.get("model_commit") else ""),
        f"- scheduler {provenance.get('scheduler')}, {provenance.get('steps')} steps, guidance "
        f"{provenance.get('guidance')}, {provenance.get('width')}x{provenance.get('height')} px",
        f"- labels: method `{spec.method}`, normalization `{provenance.get('normalize')}`; a pixel takes the class "
        f"of its strongest map when it is >= {spec.thresholds.high}, background when < {spec.thresholds.low}, "
        "and 255 (ignore) in between",
        f"- opendaam {provenance.get('opendaam')}, torch {provenance.get('torch')}, diffusers "
        f"{provenance.get('diffusers')}; spec hash `{header['spec_hash']}`",
        "- prompt templates: " + "; ".join(f"`{t}`" for t in templates),
        "",
        "## Files",
        "",
        "- `images/<key>.png`: generated image; `labels/<key>.png`: 0 background, class ids above, 255 ignore; "
        "`maps/<key>.npz`: float16 normalized map per class (`np.load`, no pickle)",
        "- `manifest.jsonl`: one line per item with prompt, seed, masks (pixels, area, confidence) and provenance; "
        "`dropped.jsonl`: items the filters dropped, with reasons",
    ]
    if "cityscapes" in spec.outputs.formats:
        lines.append("- `cityscapes/`: `leftImg8bit/` and `gtFine/` with `_labelIds.png` (Cityscapes label ids; "
                     "background and ignore are 0 = unlabeled unless `background_id` is set) and "
                     "`_labelTrainIds.png` (19 train ids, 255 ignore)")
    if "coco" in spec.outputs.formats:
        lines.append(f"- `coco/instances_{spec.outputs.split}.json`: COCO instances (RLE), one per connected "
                     "component of each class; image files under `images/`")
    if "huggingface" in spec.outputs.formats:
        lines.append(f"- `huggingface/`: parquet (`data/{spec.outputs.split}-*.parquet`, columns image, label, "
                     "prompt, seed, index) and `id2label.json`; `datasets.load_dataset(\"<DIR>/huggingface\")`")
    lines += ["", "Regenerate it bit for bit with `opendaam dataset generate spec.yaml --out DIR`.", ""]
    return atomic_write(out / "README.md", "\n".join(lines))
