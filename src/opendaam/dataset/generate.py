"""Generate a dataset: for each (prompt, seed), an image, per-class soft maps and a label map.

Layout of a dataset folder (``key`` is the item's index, ``000042``)::

    dataset.json              spec (validated), spec hash, class table
    spec.yaml                 the spec file as given
    images/<key>.png          generated image, RGB
    labels/<key>.png          uint8: 0 background, 1..K classes in spec order, 255 ignore
    maps/<key>.npz            float16 normalized map per labelled class (keys: class names), (H, W)
    shards/manifest-<r>-of-<n>.jsonl   one line per finished item, appended by process r of n
    manifest.jsonl            all items sorted by index (written by the merge step)

Crash safety: files are written atomically and the manifest line is appended last, so an item is
finished exactly when its manifest line exists; a rerun skips finished items. Sharding: process ``r`` of
``n`` takes items ``r, r + n, r + 2n, ...``; see :func:`current_shard`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from opendaam.dataset.cityscapes import label_palette
from opendaam.dataset.io import (
    TIMING_KEY,
    DatasetError,
    append_line,
    atomic_write,
    finished_items,
    item_files,
    npz_bytes,
    png_bytes,
    read_manifest,
)
from opendaam.dataset.labels import adaptive_label_map, label_map, mask_stats
from opendaam.dataset.spec import DatasetSpec, SpecError, expand_items, spec_hash, spec_to_dict
from opendaam.generation import Generated, Item, generate_traced

__all__ = [
    "DATASET_FORMAT",
    "GenerateResult",
    "Shard",
    "class_table",
    "current_shard",
    "generate",
    "shard_manifest",
]

DATASET_FORMAT = 1
"""Version of the dataset folder layout."""




@dataclass(frozen=True)
class Shard:
    """Which part of the item list this process generates."""

    rank: int = 0  # this process' index
    world: int = 1  # number of processes
    state: object | None = field(default=None, compare=False)  # accelerate's PartialState, when launched by it

    def take(self, items: list[Item]) -> list[Item]:
        """This shard's items: every ``world``-th item starting at ``rank``.

        Examples:
            >>> [it.index for it in Shard(1, 3).take([Item(i, "p", "p", 0, ()) for i in range(7)])]
            [1, 4]
        """
        return items[self.rank :: self.world]


def current_shard(rank: int | None = None, world: int | None = None) -> Shard:
    """The shard of this process: explicit values, else accelerate's ``PartialState`` when the process was
    started by ``accelerate launch``, else the ``RANK`` / ``WORLD_SIZE`` environment variables, else 0 of 1.

    When accelerate's state disagrees with ``WORLD_SIZE`` (it reports one process when it set up no process
    group, e.g. CPU-only machines launched with ``--multi_gpu``), the environment variables win and the
    shards are joined with ``opendaam dataset merge``. ``accelerate launch --num_processes N`` without
    ``--multi_gpu`` on a machine without GPUs starts a single process (it sets ``MASTER_ADDR`` but no
    ``WORLD_SIZE``): that is refused, since the user asked for N shards.

    Raises:
        DatasetError: a bad rank or world size, or accelerate started one process where several were asked.

    Examples:
        >>> current_shard(2, 4)
        Shard(rank=2, world=4, state=None)
    """
    state = None
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ  # set by accelerate launch in every process it starts
    if rank is None and world is None and launched and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        raise DatasetError(
            "accelerate launch was asked for several processes but started one (on a machine without GPUs it "
            "needs --multi_gpu): run accelerate launch --multi_gpu --num_processes N -m opendaam.cli dataset "
            "generate ..., or start N processes yourself with --rank R --world-size N")
    if rank is None and world is None and launched:
        try:
            from accelerate import PartialState

            state = PartialState()
            if "WORLD_SIZE" in os.environ and state.num_processes != int(os.environ["WORLD_SIZE"]):
                state = None  # no process group (e.g. CPU-only under --multi_gpu): trust the launcher's variables
            else:
                rank, world = state.process_index, state.num_processes
        except ImportError:
            state = None
    if world is None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    if rank is None:
        rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    if world < 1 or not 0 <= rank < world:
        raise DatasetError(f"bad shard: process {rank} of {world} (need 0 <= rank < world size)")
    return Shard(rank, world, state)


def shard_manifest(out: Path, shard: Shard) -> Path:
    """Path of a shard's manifest.

    Examples:
        >>> shard_manifest(Path("d"), Shard(1, 2)).as_posix()
        'd/shards/manifest-00001-of-00002.jsonl'
    """
    return out / "shards" / f"manifest-{shard.rank:05d}-of-{shard.world:05d}.jsonl"


def class_table(spec: DatasetSpec) -> list[dict]:
    """Label id, name and Cityscapes id of every class (label id = position in the spec + 1).

    Examples:
        >>> from opendaam.dataset.spec import parse_spec
        >>> spec = parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]},
        ...                                {"name": "tree", "prompts": ["a {}"]}]})
        >>> class_table(spec)
        [{'id': 1, 'name': 'car', 'cityscapes_id': 26}, {'id': 2, 'name': 'tree', 'cityscapes_id': None}]
    """
    from opendaam.dataset.cityscapes import cityscapes_id

    return [
        {"id": i + 1, "name": c.name,
         "cityscapes_id": c.cityscapes_id if c.cityscapes_id is not None else cityscapes_id(c.name)}
        for i, c in enumerate(spec.classes)
    ]


@dataclass(frozen=True)
class GenerateResult:
    """What one :func:`generate` call did."""

    out: Path  # the dataset folder
    generated: int  # items made by this call
    skipped: int  # items of this shard found finished
    total: int  # items in the whole dataset
    shard: Shard  # which part this process made
    finalized: bool  # manifest, filters, exports and card were written (all items were finished)
    kept: int | None = None  # items the filters kept (None: not finalized by this call)


def _dataset_header(spec: DatasetSpec, digest: str) -> dict:
    """Contents of ``dataset.json``."""
    from opendaam import __version__

    return {"format": DATASET_FORMAT, "spec_hash": digest, "opendaam": __version__, "spec": spec_to_dict(spec),
            "classes": class_table(spec)}


def _check_folder(out: Path, digest: str, force: bool) -> dict | None:
    """Refuse a folder this spec may not write (read-only: nothing is written); returns the old header.

    A folder without ``dataset.json`` must be empty, or (with ``force``) hold none of the names opendaam
    writes; a dataset of another spec needs ``force``; files opendaam did not write inside the folders it
    manages are always refused.
    """
    from opendaam.dataset.folder import MANAGED_FOLDERS, TOP_LEVEL_FILES, refuse_foreign_files

    header_path = out / "dataset.json"
    if out.exists() and not out.is_dir():
        raise DatasetError(f"--out {out} is a file, not a folder; choose a folder (it is created if missing)")
    old = None
    if out.exists() and not header_path.exists():
        others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".opendaam")
                        and not (p.name.startswith(".") and p.name.endswith(".tmp")))
        # another shard may have written its header (always its first file) since the check above
        if others and not header_path.exists():
            clashes = [n for n in others if n in MANAGED_FOLDERS or n in TOP_LEVEL_FILES]
            found = ", ".join((clashes or others)[:3])
            if not force:
                raise DatasetError(f"{out} is not empty and holds no opendaam dataset (found {found}); choose "
                                   "another --out, or pass --force to add the dataset beside those files")
            if clashes:
                raise DatasetError(f"{out} holds no opendaam dataset but has files named like a dataset's "
                                   f"({found}); even with --force opendaam does not overwrite them: choose "
                                   "another --out")
    if header_path.exists():
        try:
            old = json.loads(header_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if not isinstance(old, dict):
            old = {}
        if old.get("spec_hash") != digest and not force:
            raise DatasetError(
                f"{out} holds a dataset made from a different spec (hash {str(old.get('spec_hash'))[:12]}, this "
                f"spec {digest[:12]}); choose another --out, or pass --force to regenerate it from this spec"
            )
        refuse_foreign_files(out)
    return old


def _write_header(out: Path, spec: DatasetSpec, digest: str, spec_text: str | None, spec_name: str) -> None:
    """Write ``dataset.json`` and the spec file (when they differ from what is there)."""
    header_path = out / "dataset.json"
    header = json.dumps(_dataset_header(spec, digest), indent=2, sort_keys=True) + "\n"
    if not header_path.exists() or header_path.read_text() != header:
        atomic_write(header_path, header)
    if spec_text is not None:
        target = out / spec_name
        if not target.exists() or target.read_text() != spec_text:
            atomic_write(target, spec_text)


def _repair_own_manifest(path: Path, digest: str) -> None:
    """Drop a torn last line and lines of another spec from this shard's manifest (atomically)."""
    if not path.exists():
        return
    entries = read_manifest(path)
    keep = [e for e in entries if e.get("provenance", {}).get("spec_hash") == digest]
    text = "".join(json.dumps(e, sort_keys=True, separators=(",", ":")) + "\n" for e in keep)
    if path.read_bytes() != text.encode():
        atomic_write(path, text)


def _resolve_model(spec: DatasetSpec) -> str:
    """The model id, or the folder relative to the spec file when such a pipeline folder exists."""
    model = spec.model_spec.id
    local = Path(spec.base_dir) / model
    if not Path(model).is_absolute() and (local / "model_index.json").exists():
        return str(local)
    return model


def _class_queries(spec: DatasetSpec, pipe) -> dict[str, list]:
    """Per class, what is mapped: the prompt text (DAAM), else its words and/or optimized token."""
    from opendaam.optimize import load_token

    queries: dict[str, list] = {}
    for cls in spec.classes:
        if spec.method == "daam":
            queries[cls.name] = [cls.prompt_text]
            continue
        chosen: list = list(cls.words)
        path = spec.token_path(cls)
        if path is not None:
            chosen.append(load_token(path, pipe=pipe))
        queries[cls.name] = chosen or [cls.prompt_text]
    return queries


def class_scores(record, spec: DatasetSpec, classes: tuple[str, ...], queries: dict[str, list], pipe) -> np.ndarray:
    """Normalized float16 maps of ``classes`` for one record, ``(classes, H, W)``.

    A class with several words (or a token) gets the mean of their raw maps, normalized once
    (``max`` for DAAM and open_vocab, ``minmax`` for linear unless the spec says otherwise).
    Open-vocabulary maps are computed one query at a time, so that a class' map does not depend on the
    other classes of the image (their words would join the context prompt X').
    """
    from opendaam.heatmaps import Heatmaps, heatmaps

    flat = [q for name in classes for q in queries[name]]
    groups = [[q] for q in flat] if spec.method == "open_vocab" else [flat]
    parts = [heatmaps(record, group, spec.method, pipe=pipe) for group in groups]
    if spec.refine is not None:  # each pixel collects the maps over the pixels it attends to
        from opendaam.refine import refine

        parts = [refine(record, part, spec.refine.power, spec.refine.layers) for part in parts]
    maps = parts[0]
    latent = torch.cat([p.latent.detach().float() for p in parts])  # (queries, h, w)
    pooled, start = [], 0
    for name in classes:
        count = len(queries[name])
        pooled.append(latent[start : start + count].mean(dim=0))
        start += count
    per_class = Heatmaps(torch.stack(pooled), list(classes), method=spec.method, image_size=maps.image_size,
                         mode=maps.mode)  # latent (classes, h, w)
    scores = per_class.normalized(spec.normalize).clamp(0.0, 1.0)  # (classes, H, W)
    return scores.cpu().numpy().astype(np.float16)


def _provenance(spec: DatasetSpec, digest: str, call: dict, pipe, record) -> dict:
    """Provenance fields shared by the manifest lines."""
    import diffusers

    from opendaam import __version__

    return {
        "model": spec.model_spec.id, "revision": spec.model_spec.revision, "model_commit": record.meta.get("revision"),
        "scheduler": type(pipe.scheduler).__name__, "steps": call["num_inference_steps"],
        "guidance": call["guidance_scale"], "height": call["height"], "width": call["width"],
        "method": spec.method, "normalize": spec.normalize or ("minmax" if spec.method == "linear" else "max"),
        "thresholds": [spec.thresholds.low, spec.thresholds.high], "opendaam": __version__,
        "torch": torch.__version__, "diffusers": diffusers.__version__, "spec_hash": digest,
    }


def generate(
    spec: DatasetSpec,
    out: str | Path,
    *,
    force: bool = False,
    pipe=None,
    shard: Shard | None = None,
    threads: int | None = None,
    device: str | None = None,
    progress: bool = True,
    limit: int | None = None,
    spec_text: str | None = None,
    spec_name: str = "spec.yaml",
    finalize: bool = True,
) -> GenerateResult:
    """Generate (or finish) this process' share of a dataset; merge and export when all items are done.

    Args:
        spec: the validated spec.
        out: dataset folder (created if missing).
        force: write into a folder made from another spec (its stale items are regenerated or removed), or
            beside other files in a folder holding no dataset; files opendaam did not write are never
            deleted or overwritten.
        pipe: an already loaded pipeline (the spec's model id is then only provenance); None loads it.
        shard: this process' part; None detects it (:func:`current_shard`).
        threads: torch intra-op threads (None: torch's choice); set it for reproducible timing.
        device: where to run; None: accelerate's device when launched by it, else CUDA if available.
        progress: show a progress bar on stderr.
        limit: stop after generating this many items (the rest is left for a rerun).
        spec_text: the spec file's text, copied into the folder as ``spec_name``.
        spec_name: file name for ``spec_text``.
        finalize: run :func:`opendaam.dataset.merge.finalize` when every item of the dataset is finished.

    Returns:
        A :class:`GenerateResult`.

    Raises:
        DatasetError: the folder holds another spec's dataset (without ``force``), files opendaam did not
            write inside its folders, or cannot be written.
        opendaam._io.LockError: another process writes the folder (or this shard of it).

    Examples:
        >>> import tempfile
        >>> from opendaam.dataset.spec import parse_spec
        >>> from opendaam.models import build_pipeline
        >>> spec = parse_spec({"classes": [{"name": "car", "prompts": ["a red {}"]}], "steps": 1,
        ...                    "height": 32, "width": 32, "outputs": {"formats": []}})
        >>> result = generate(spec, tempfile.mkdtemp(), pipe=build_pipeline("tiny"), progress=False)
        >>> result.generated, result.finalized
        (1, True)
    """
    from opendaam.dataset.folder import dataset_lock

    out = Path(out)
    shard = shard or current_shard()
    digest = spec_hash(spec)
    created = not out.exists()
    try:
        with dataset_lock(out, shard.rank, shard.world, what=f"opendaam dataset generate (shard {shard.rank} of "
                          f"{shard.world})"):
            return _generate_locked(spec, out, digest, force=force, pipe=pipe, shard=shard, threads=threads,
                                    device=device, progress=progress, limit=limit, spec_text=spec_text,
                                    spec_name=spec_name, finalize=finalize)
    finally:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # refused or failed before writing anything: leave no empty folder behind


def _generate_locked(spec: DatasetSpec, out: Path, digest: str, *, force: bool, pipe, shard: Shard,
                     threads: int | None, device: str | None, progress: bool, limit: int | None,
                     spec_text: str | None, spec_name: str, finalize: bool) -> GenerateResult:
    """:func:`generate` while holding the folder's lock: check the folder, load the model, then write."""
    from opendaam.models import generation_defaults, load_pipeline, set_threads

    set_threads(threads)
    _check_folder(out, digest, force)
    items = expand_items(spec)
    own_manifest = shard_manifest(out, shard)
    done = finished_items(out, digest)
    todo = [it for it in shard.take(items) if it.index not in done]
    skipped = len(shard.take(items)) - len(todo)
    if limit is not None:
        todo = todo[: max(limit, 0)]

    if todo:  # the model loads before the first write: a model that fails to load leaves the folder as it was
        if pipe is None:
            model = spec.model_spec
            dtype = getattr(torch, model.dtype) if model.dtype else None
            pipe = load_pipeline(_resolve_model(spec), scheduler=spec.scheduler, dtype=dtype, revision=model.revision)
            if device is None and shard.state is not None:
                device = str(shard.state.device)
            if device is None and torch.cuda.is_available():
                device = "cuda"
            if device is not None:
                pipe = pipe.to(device)
        elif spec.scheduler is not None:
            from opendaam.models import make_scheduler

            pipe.scheduler = make_scheduler(spec.scheduler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        call = generation_defaults(pipe, num_inference_steps=spec.steps, guidance_scale=spec.guidance,
                                   height=spec.height, width=spec.width)
        _check_refine_layers(spec, pipe)
    _write_header(out, spec, digest, spec_text, spec_name)
    _repair_own_manifest(own_manifest, digest)
    if todo:
        _generate_items(spec, out, pipe, todo, call, digest, own_manifest, shard, progress)

    finalized, kept = False, None
    if shard.world > 1 and shard.state is not None:
        shard.state.wait_for_everyone()  # accelerate: every shard is finished before process 0 merges
    complete = len(finished_items(out, digest)) == len(items)
    if finalize and complete and (shard.world == 1 or (shard.state is not None and shard.rank == 0)):
        from opendaam.dataset.merge import finalize as run_finalize

        kept = run_finalize(out, others_done=shard.world > 1)["kept"]
        finalized = True
    return GenerateResult(out, len(todo), skipped, len(items), shard, finalized, kept)


@functools.lru_cache(maxsize=8)
def _palette(spec: DatasetSpec) -> np.ndarray:
    """The colours of the dataset's label values: its classes' Cityscapes colours (frozen specs are hashable)."""
    return label_palette(classes=class_table(spec))


def _check_refine_layers(spec: DatasetSpec, pipe) -> None:
    """Refinement layers the model has, before anything is written (else a SpecError naming its layers)."""
    if spec.refine is None:
        return
    from opendaam.tracing import adapter_for
    from opendaam.tracing.tracer import expand_layers

    adapter = adapter_for(pipe)
    try:
        names = list(adapter.self_layers(adapter.denoiser(pipe)))
        expand_layers(names, spec.refine.layers, "the model's self-attention layers")
    except ValueError as error:
        raise SpecError(f"spec key 'refine.layers': {error}") from None


def _generate_items(spec: DatasetSpec, out: Path, pipe, todo: list[Item], call: dict, digest: str,
                    manifest: Path, shard: Shard, progress: bool) -> None:
    """The generation loop (:func:`opendaam.generation.generate_traced`) with this dataset's writer."""
    from opendaam.tracing import TraceConfig

    config = TraceConfig(daam=spec.method == "daam", queries=spec.method == "open_vocab",
                         linear=spec.method == "linear",
                         self_attention=spec.refine.layers if spec.refine is not None else None)
    queries = _class_queries(spec, pipe)
    ids = {c["name"]: c["id"] for c in class_table(spec)}
    provenance: dict = {}  # filled from the first record: every item shares it

    def write(done: Generated) -> None:
        if not provenance:
            provenance.update(_provenance(spec, digest, call, pipe, done.record))
        _write_item(spec, out, pipe, done, manifest, queries, ids, provenance)

    desc = "dataset" if shard.world == 1 else f"dataset {shard.rank}/{shard.world}"
    generate_traced(pipe, todo, write, config=config, call=call, desc=desc, progress=progress,
                    meta=lambda item: {"seed": item.seed, "dataset_index": item.index})


def _write_item(spec: DatasetSpec, out: Path, pipe, done: Generated, manifest: Path, queries: dict[str, list],
                ids: dict[str, int], provenance: dict) -> None:
    """Label and write one generated item, then append its manifest line (last: it marks the item finished)."""
    item, record = done.item, done.record
    low, high = spec.thresholds.low, spec.thresholds.high
    generated = time.perf_counter()
    scores = class_scores(record, spec, item.classes, queries, pipe)  # (classes, H, W) float16
    item_ids = [ids[name] for name in item.classes]
    if spec.thresholds.mode == "adaptive":
        labels = adaptive_label_map(scores.astype(np.float32), item_ids, spec.thresholds.margin,
                                    spec.thresholds.min_gap)  # (H, W) uint8
    else:
        labels = label_map(scores.astype(np.float32), item_ids, low, high)  # (H, W) uint8
    stats = mask_stats(labels, scores, item_ids, item.classes)
    labelled = time.perf_counter()

    files = item_files(item.key)
    label_png = png_bytes(labels, _palette(spec))  # palette PNG: the ids stay, viewers see Cityscapes colours
    atomic_write(out / files["image"], png_bytes(done.image))
    atomic_write(out / files["maps"], npz_bytes(dict(zip(item.classes, scores, strict=True))))
    atomic_write(out / files["label"], label_png)
    total = labels.size
    entry = {
        "index": item.index, "key": item.key, "prompt": item.prompt, "template": item.template,
        "seed": item.seed, "classes": list(item.classes), "files": files,
        "label_sha256": hashlib.sha256(label_png).hexdigest(), "masks": stats,
        "background": round(float((labels == 0).sum()) / total, 6),
        "ignored": round(float((labels == 255).sum()) / total, 6),
        "provenance": provenance,
    }
    written = time.perf_counter()
    entry[TIMING_KEY] = {"generate_s": round(done.seconds, 4), "label_s": round(labelled - generated, 4),
                         "write_s": round(written - labelled, 4)}
    append_line(manifest, entry)  # last: the item counts as finished only once its files exist
