"""The thesis experiment end to end: generate, annotate, split, optimize tokens, evaluate, tabulate.

* :func:`generate_items` makes the dataset "a <class> in an urban environment" over seeds, resumably
  (records, images and masks written atomically; finished items are skipped on a rerun);
* :func:`evaluate` turns maps of every method into threshold curves of confusion counts per class;
* :func:`summarize` gives the thesis' tables (max mIoU, AUC, train vs test) as rows;
* :func:`ablation` gives the per-block x per-step mIoU matrix (thesis appendix A).

Baselines are always available beside the methods: the class prior (mean training mask of the class used
as a heatmap), a centred box of the prior's mean area, and random maps.

Seventh layer of opendaam: imports models, tracing, generation, cache, heatmaps, optimize and metrics; never
viz or cli.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from opendaam import generation
from opendaam._io import atomic_write_with
from opendaam.cache import load_record
from opendaam.generation import Generated, generate_traced
from opendaam.heatmaps import heatmaps
from opendaam.metrics import curve_summary, default_thresholds, iou_score, mean_iou, percentile_band, threshold_curve
from opendaam.optimize import OptimizedToken, optimize_token
from opendaam.tracing import Record, TraceConfig
from opendaam.tracing.adapters import flow_order

__all__ = [
    "BASELINES",
    "METHODS",
    "THESIS_CLASSES",
    "Evaluation",
    "Item",
    "Split",
    "ThesisConfig",
    "ToyWorldAnnotator",
    "ablation",
    "center_box",
    "evaluate",
    "generate_items",
    "load_items",
    "read_mask",
    "run_thesis",
    "split_items",
    "summarize",
    "write_tables",
]

THESIS_CLASSES = ("car", "person", "traffic light", "rider")
"""The four classes of the thesis' dataset."""

TEMPLATE = "a {} in an urban environment"
"""The thesis' prompt template."""

CONTROL_WORD = "environment"
"""A word of the template that names no object: its DAAM map is a baseline a class word must beat."""


@dataclass(frozen=True, init=False)
class Item(generation.Item):
    """One image of an experiment: a single-class :class:`opendaam.generation.Item` with its files (paths
    relative to the dataset root, or absolute).

    Examples:
        >>> item = Item("car_3", "car", "a car in an urban environment", 3, "records/car_3.safetensors",
        ...             "masks/car_3.png", "images/car_3.png")
        >>> item.id, item.cls, item.key, item.classes, item.template
        ('car_3', 'car', 'car_3', ('car',), 'a {} in an urban environment')
    """

    # __init__ sets all three; the defaults only let them follow the base's defaulted field
    record: str = ""  # record file
    mask: str = ""  # binary mask PNG at image size
    image: str = ""  # generated image PNG

    def __init__(self, id: str, cls: str, prompt: str, seed: int, record: str, mask: str, image: str, *,
                 index: int = 0, template: str = TEMPLATE):
        super().__init__(index, prompt, template, seed, (cls,), stem=id)
        for name, value in (("record", record), ("mask", mask), ("image", image)):
            object.__setattr__(self, name, value)  # frozen: the generated __init__ sets fields the same way

    def entry(self) -> dict:
        """The item as listed in ``items.json``.

        Examples:
            >>> Item("car_3", "car", "a car", 3, "r", "m", "i").entry()
            {'id': 'car_3', 'cls': 'car', 'prompt': 'a car', 'seed': 3, 'record': 'r', 'mask': 'm', 'image': 'i'}
        """
        return {"id": self.id, "cls": self.cls, "prompt": self.prompt, "seed": self.seed, "record": self.record,
                "mask": self.mask, "image": self.image}


class ToyWorldAnnotator:
    """Exact masks for toy-urban: img2img from a rendered scene whose label map is known.

    Args:
        strength: img2img strength; 0.5 keeps the scene's layout (so its labels stay exact: the annotator net
            scores 0.71-0.92 IoU on the outputs against the rendered masks, TRAINING.md) while the model
            redraws the image from its own prior.
    """

    def __init__(self, strength: float = 0.5):
        self.strength = strength

    def init_image(self, cls: str, seed: int) -> Image.Image:
        """The rendered scene that img2img starts from."""
        from opendaam.toyworld.scene import render_scene

        return render_scene(seed, cls=cls).pil()

    def mask(self, cls: str, seed: int, size: tuple[int, int]) -> np.ndarray:
        """The class mask of the rendered scene, at ``size`` (H, W)."""
        from opendaam.toyworld.scene import render_scene

        mask = render_scene(seed, cls=cls).mask(cls)
        if mask.shape != tuple(size):
            mask = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize(size[::-1], Image.NEAREST)) > 0
        return mask.astype(bool)


def generate_items(
    pipe,
    out: str | Path,
    classes: Sequence[str] = THESIS_CLASSES,
    per_class: int = 50,
    *,
    annotator: ToyWorldAnnotator | None = None,
    seed0: int = 0,
    call: dict | None = None,
    template: str = TEMPLATE,
    progress: bool = True,
) -> list[Item]:
    """Generate and trace the experiment's images, resumably; returns the items in class-major order.

    Each item writes ``records/<id>.safetensors``, ``images/<id>.png`` and ``masks/<id>.png`` atomically,
    the record last, so an item whose record exists is complete and is skipped on a rerun.

    Args:
        pipe: an image-to-image pipeline when ``annotator`` starts from rendered scenes, else text-to-image
            (then masks must be provided separately, e.g. by hand: the items list them as missing).
        out: dataset folder.
        classes: class names; prompts are ``template.format(cls)``.
        per_class: images per class; seeds are ``seed0 .. seed0 + per_class - 1``.
        annotator: gives init images and exact masks (:class:`ToyWorldAnnotator`), or None.
        call: extra pipeline arguments (steps, guidance, ...).
        template: prompt template with one ``{}`` for the class.
        progress: show a progress bar.
    """
    out = Path(out)
    items = []
    for cls in classes:
        for seed in range(seed0, seed0 + per_class):
            iid = f"{cls.replace(' ', '_')}_{seed}"
            items.append(Item(iid, cls, template.format(cls), seed, f"records/{iid}.safetensors", f"masks/{iid}.png",
                              f"images/{iid}.png", index=len(items), template=template))

    def write(done: Generated) -> None:
        item = done.item
        atomic_write_with(out / item.image, lambda p: Image.fromarray(done.image).save(p, format="PNG"))
        if annotator is not None:
            mask = annotator.mask(item.cls, item.seed, done.record.image_size)
            atomic_write_with(out / item.mask, lambda p: Image.fromarray(mask.astype(np.uint8) * 255).save(
                p, format="PNG"))
        done.record.save(out / item.record)  # last: an item whose record exists is finished

    scenes = {} if annotator is None else {  # img2img from the annotator's rendered scene
        "init_image": lambda item: annotator.init_image(item.cls, item.seed), "strength": annotator.strength}
    generate_traced(pipe, items, write, config=TraceConfig(queries=True, daam_per_step=True), call=call,
                    finished=lambda item: (out / item.record).exists(),
                    meta=lambda item: {"class": item.cls, "seed": item.seed, "id": item.id}, progress=progress,
                    **scenes)
    manifest = {"items": [i.entry() for i in items], "template": template, "classes": list(classes)}
    atomic_write_with(out / "items.json", lambda p: p.write_text(json.dumps(manifest, indent=1)))
    return items


def load_items(root: str | Path) -> list[Item]:
    """The items of a dataset folder written by :func:`generate_items`.

    Raises:
        FileNotFoundError: no ``items.json``, or files missing for some items (all listed).
    """
    root = Path(root)
    if not (root / "items.json").exists():
        raise FileNotFoundError(f"{root} has no items.json; make it with generate_items or opendaam experiment")
    listing = json.loads((root / "items.json").read_text())
    template = listing.get("template", TEMPLATE)
    items = [Item(**d, index=i, template=template) for i, d in enumerate(listing["items"])]
    missing = [i.id for i in items if not (root / i.record).exists() or not (root / i.mask).exists()]
    if missing:
        raise FileNotFoundError(f"records or masks missing for items: {', '.join(missing)}")
    return items


def read_mask(path: Path, size: tuple[int, int]) -> Tensor:
    """A boolean ``(H, W)`` mask from a PNG, checked against the record's image size and binarity.

    Examples:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "m.png")
        >>> Image.fromarray(np.array([[0, 255]], dtype=np.uint8)).save(path)
        >>> read_mask(Path(path), (1, 2)).tolist()
        [[False, True]]
    """
    array = np.array(Image.open(path))
    if array.ndim == 3:
        array = array[..., 0]
    values = np.unique(array)
    if not set(values.tolist()) <= {0, 1, 255}:
        raise ValueError(f"mask {path} is not binary (values {values[:8].tolist()}...); save 0/255 masks")
    if array.shape != tuple(size):
        raise ValueError(f"mask {path} is {array.shape} but its record's image is {tuple(size)}")
    return torch.from_numpy(array > 0)


# -- methods: (record, class, context) -> soft map (H, W), normalization --------------------------------


@dataclass
class _Context:
    """What method functions may use besides the record: the pipeline, tokens, priors."""

    pipe: object = None
    tokens: dict[tuple[str, str], OptimizedToken] = field(default_factory=dict)  # (method, class) -> token
    priors: dict[str, Tensor] = field(default_factory=dict)  # class -> mean training mask (H, W)
    seed: int = 0


def _daam(record: Record, cls: str, ctx: _Context) -> Tensor:
    return heatmaps(record, cls).soft[0]


def _linear(record: Record, cls: str, ctx: _Context) -> Tensor:
    return heatmaps(record, cls, "linear", pipe=ctx.pipe).soft[0]


def _open_vocab(record: Record, cls: str, ctx: _Context) -> Tensor:
    return heatmaps(record, cls, "open_vocab", pipe=ctx.pipe).soft[0]


def _optimized(kind: str) -> Callable[[Record, str, _Context], Tensor]:
    """Map with the class' optimized token of ``kind`` (linear or open_vocab)."""

    def fn(record: Record, cls: str, ctx: _Context) -> Tensor:
        token = ctx.tokens.get((kind, cls))
        if token is None:
            raise ValueError(f"no optimized {kind} token for class {cls!r}")
        return heatmaps(record, token, kind, pipe=ctx.pipe).soft[0]

    return fn


def _prior(record: Record, cls: str, ctx: _Context) -> Tensor:
    if cls not in ctx.priors:
        raise ValueError(f"no training masks of class {cls!r} for the class prior")
    return ctx.priors[cls]


@dataclass(frozen=True)
class Split:
    """Items split per class into training images (which make the class prior) and held-out test images."""

    train: dict[str, list[Item]]  # class -> its first ``train`` items
    test: list[Item]  # every item past the first ``pool`` of its class, in the items' order
    priors: dict[str, Tensor]  # class -> mean of its training masks (all its masks when ``train`` is 0), (H, W)


def split_items(items: Sequence[Item], mask_size: Callable[[Item], tuple[int, int]], train: int = 0,
                pool: int | None = None, root: str | Path = "/") -> Split:
    """Per class, the first ``train`` items are training images (the class prior is their mean mask) and the
    first ``pool`` items (default: ``train``) are left out of the test set; the prior is in-sample (all masks)
    when ``train`` is 0.

    Args:
        items: items of any classes, each class in its own order.
        mask_size: ``(H, W)`` an item's mask must have (its record's image size).
        train: training images per class.
        pool: images per class left out of the test set (at least ``train``).
        root: folder the items' mask paths are relative to.

    Raises:
        ValueError: ``pool`` below ``train`` (training images would be tested), or a class without test images.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> for k in range(4):
        ...     Image.fromarray(np.full((2, 2), 255 * (k % 2), np.uint8)).save(folder / f"{k}.png")
        >>> items = [Item(f"car_{k}", "car", "a car", k, "r", f"{k}.png", "i") for k in range(4)]
        >>> split = split_items(items, lambda item: (2, 2), train=2, pool=3, root=folder)
        >>> [i.id for i in split.test], split.priors["car"].tolist()
        (['car_3'], [[0.5, 0.5], [0.5, 0.5]])
    """
    pool = train if pool is None else pool
    if pool < train:
        raise ValueError(f"pool {pool} is smaller than train {train}: training images would be tested")
    classes = list(dict.fromkeys(i.cls for i in items))
    by_class = {c: [i for i in items if i.cls == c] for c in classes}
    held = {i.id for c in classes for i in by_class[c][:pool]}
    test = [i for i in items if i.id not in held]
    empty = [c for c in classes if not any(i.cls == c for i in test)]
    if empty:
        raise ValueError(f"classes with no test images: {', '.join(empty)} (fewer training or held-out images, "
                         "or more images)")
    chosen = {c: by_class[c][:train] for c in classes}
    priors = {}
    for c in classes:
        sources = chosen[c] or by_class[c]
        priors[c] = torch.stack([read_mask(Path(root) / i.mask, mask_size(i)).float() for i in sources]).mean(0)
    return Split(train=chosen, test=test, priors=priors)


def center_box(prior: Tensor) -> Tensor:
    """A centred box with the mean area of a class prior ``(H, W)`` (the "centred box" baseline).

    Examples:
        >>> center_box(torch.full((4, 4), 0.25)).int().tolist()
        [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    """
    h, w = prior.shape
    area = float(prior.mean())
    side_h, side_w = max(1, round(h * area**0.5)), max(1, round(w * area**0.5))
    box = torch.zeros(h, w)
    top, left = (h - side_h) // 2, (w - side_w) // 2
    box[top : top + side_h, left : left + side_w] = 1.0
    return box


def _center_box(record: Record, cls: str, ctx: _Context) -> Tensor:
    return center_box(_prior(record, cls, ctx))


def _control_word(record: Record, cls: str, ctx: _Context) -> Tensor:
    """DAAM of a prompt word that names no object ("environment" in the thesis template)."""
    return heatmaps(record, CONTROL_WORD).soft[0]


def _random(record: Record, cls: str, ctx: _Context) -> Tensor:
    gen = torch.Generator().manual_seed(ctx.seed + int(record.meta.get("seed", 0)) * 7919 + len(cls))
    return torch.rand(tuple(record.image_size), generator=gen)


METHODS: dict[str, tuple[Callable[[Record, str, _Context], Tensor], str]] = {
    "daam": (_daam, "max"),
    "linear": (_linear, "minmax"),
    "open_vocab": (_open_vocab, "max"),
    "daam_opt": (_optimized("open_vocab"), "max"),
    "linear_opt": (_optimized("linear"), "minmax"),
}
"""Evaluated methods: name -> (map function, normalization before thresholding)."""

BASELINES: dict[str, tuple[Callable[[Record, str, _Context], Tensor], str]] = {
    "class_prior": (_prior, "max"),
    "center_box": (_center_box, "max"),
    "random": (_random, "max"),
    "control_word": (_control_word, "max"),
}
"""Baselines reported beside every evaluation."""


@dataclass
class Evaluation:
    """Threshold curves of every method and class.

    Attributes:
        thresholds: ``(T,)`` taus.
        curves: method -> class -> ``(T, images, 4)`` confusion counts.
        ids: class -> item ids in the curves' image order.
    """

    thresholds: Tensor
    curves: dict[str, dict[str, Tensor]]
    ids: dict[str, list[str]]


def evaluate(
    items: Sequence[Item],
    root: str | Path,
    methods: Sequence[str] = ("daam", "linear"),
    *,
    pipe=None,
    tokens: dict[tuple[str, str], OptimizedToken] | None = None,
    priors: dict[str, Tensor] | None = None,
    thresholds: Tensor | None = None,
    baselines: bool = True,
    records: dict[str, Record] | None = None,
) -> Evaluation:
    """Threshold curves (confusion counts per tau and image) for each method and class on ``items``.

    Args:
        items: the images to evaluate (their masks are the ground truth).
        root: the dataset folder the items' paths are relative to.
        methods: names from :data:`METHODS`; baselines from :data:`BASELINES` are added when
            ``baselines`` and class priors are known.
        pipe: the pipeline (linear maps of words outside the prompt, open_vocab).
        tokens: optimized tokens by (``"linear"`` or ``"open_vocab"``, class).
        priors: class -> mean training mask, for the class-prior and centred-box baselines.
        thresholds: taus (default 0 to 1 in steps of 0.05).
        records: already loaded records by item id (saves reading them again).
    """
    root = Path(root)
    taus = default_thresholds() if thresholds is None else thresholds
    table = {**{m: METHODS[m] for m in _check_methods(methods)}}
    if baselines and priors:
        table.update(BASELINES)
    ctx = _Context(pipe=pipe, tokens=dict(tokens or {}), priors=dict(priors or {}))
    curves: dict[str, dict[str, list[Tensor]]] = {m: {} for m in table}
    ids: dict[str, list[str]] = {}
    dropped: set[str] = set()
    for item in items:
        record = (records or {}).get(item.id) or load_record(root / item.record)
        mask = read_mask(root / item.mask, record.image_size)
        ids.setdefault(item.cls, []).append(item.id)
        for name, (fn, kind) in table.items():
            if name in dropped:
                continue
            try:
                with torch.no_grad():
                    soft = fn(record, item.cls, ctx).float()
            except KeyError:
                if name != "control_word":
                    raise
                dropped.add(name)  # the control word is not in every prompt: no such baseline here
                continue
            curves[name].setdefault(item.cls, []).append(threshold_curve(soft[None], mask[None], taus, kind))
    stacked = {m: {c: torch.cat(v, dim=1) for c, v in per.items()} for m, per in curves.items() if m not in dropped}
    return Evaluation(thresholds=taus, curves=stacked, ids=ids)


def _check_methods(methods: Sequence[str]) -> list[str]:
    """``methods``, or an error naming the valid ones."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from: {', '.join(METHODS)}")
    return list(methods)


def summarize(evaluation: Evaluation, reduction: str = "per_image") -> dict:
    """Max mIoU, best tau, AUC (x100) per method and class, plus the mean over classes ("all"),
    the per-tau mIoU curve and its 5th/95th percentile band (for plots)."""
    out = {}
    taus = evaluation.thresholds
    for method, per_class in evaluation.curves.items():
        rows = {}
        for cls, curve in per_class.items():
            s = curve_summary(curve, taus, reduction)
            per_image = iou_score(curve)  # (T, images)
            rows[cls] = {
                "max_miou": 100 * s["max_miou"], "best_tau": s["best_tau"], "auc": 100 * s["auc"],
                "images": int(curve.shape[1]),
                "curve": (100 * mean_iou(curve, reduction)).tolist(),
                "band": (100 * percentile_band(per_image)).tolist(),
            }
        rows["all"] = {k: float(np.mean([r[k] for r in rows.values()])) for k in ("max_miou", "auc")}
        out[method] = rows
    return out


def ablation(items: Sequence[Item], root: str | Path, thresholds: Tensor | None = None,
             records: dict[str, Record] | None = None) -> dict:
    """Max mIoU of DAAM restricted to one U-Net block and one step, for every (block, step) pair.

    Returns:
        ``{"blocks": [...], "steps": [...], "miou": [[...]] (blocks x steps, x100)}``.
    """
    root = Path(root)
    taus = default_thresholds() if thresholds is None else thresholds
    loaded = [((records or {}).get(i.id) or load_record(root / i.record), i) for i in items]
    first = loaded[0][0]
    blocks = sorted({n.split(".attentions")[0] for n in first.layers}, key=flow_order)
    steps = first.steps
    matrix = torch.zeros(len(blocks), len(steps))
    for b, block in enumerate(blocks):
        for s, step in enumerate(steps):
            curves = []
            for record, item in loaded:
                mask = read_mask(root / item.mask, record.image_size)
                soft = heatmaps(record, item.cls, layers=block, steps=step).soft[0]
                curves.append(threshold_curve(soft[None], mask[None], taus))
            matrix[b, s] = 100 * curve_summary(torch.cat(curves, dim=1), taus)["max_miou"]
    return {"blocks": blocks, "steps": steps, "miou": matrix.tolist()}


# -- the whole protocol ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThesisConfig:
    """The thesis protocol (chapter 4), at any size."""

    classes: tuple[str, ...] = THESIS_CLASSES  # the thesis' four urban classes
    per_class: int = 50  # the thesis used 50 images per class
    train_sizes: tuple[int, ...] = (1, 2, 5)  # training images per class for the optimized tokens (table 4.1)
    report_train: int = 2  # the tables 4.2/4.3 use tokens trained on this many images (the thesis' best)
    steps: int | None = None  # denoising steps; None: the model's own (the thesis: PNDM, 30)
    guidance: float | None = None  # guidance scale; None: the model's own
    strength: float = 0.5  # img2img strength of the toy-world annotator: person and rider drift from 0.6 on
    seed0: int = 0  # first seed (images use seed0 .. seed0 + per_class - 1); toy-urban: use held-out seeds
    tau_step: float = 0.05  # threshold curve resolution
    optimize_epochs: int = 300  # token optimization budget per (class, size, method)


def run_thesis(pipe, out: str | Path, config: ThesisConfig | None = None, *, annotator=None,
               masks_dir: str | Path | None = None, progress: bool = True) -> dict:
    """The thesis experiment: dataset, tokens (1/2/5 training images), evaluation of all four methods and
    the baselines, tables 4.1-4.3. Writes ``tables.md``, ``*.csv``, ``summary.json`` under ``out``.

    Returns:
        The summary dict (also in ``summary.json``).
    """
    from opendaam.models import generation_defaults

    cfg = config or ThesisConfig()
    out = Path(out)
    if max(cfg.train_sizes) >= cfg.per_class:
        raise ValueError(f"per_class={cfg.per_class} leaves no test images after {max(cfg.train_sizes)} "
                         "training images: raise --per-class")
    defaults = generation_defaults(pipe)
    call = {"num_inference_steps": cfg.steps or defaults["num_inference_steps"],
            "guidance_scale": cfg.guidance if cfg.guidance is not None else defaults["guidance_scale"]}
    if annotator is None:
        call.update(height=defaults["height"], width=defaults["width"])
    items = generate_items(pipe, out / "data", cfg.classes, cfg.per_class, annotator=annotator, seed0=cfg.seed0,
                           call=call, progress=progress)
    root = out / "data"
    if masks_dir is not None:
        _copy_masks(items, Path(masks_dir), root)
    records = {i.id: load_record(root / i.record) for i in items}
    pool = max(cfg.train_sizes)
    train = {c: [i for i in items if i.cls == c][:pool] for c in cfg.classes}
    test = [i for i in items if i.id not in {t.id for ts in train.values() for t in ts}]
    masks = {i.id: read_mask(root / i.mask, records[i.id].image_size) for i in items}
    taus = default_thresholds(cfg.tau_step)

    tokens_by_size: dict[int, dict[tuple[str, str], OptimizedToken]] = {}
    for n in cfg.train_sizes:
        tokens = {}
        for cls in cfg.classes:
            chosen = train[cls][:n]
            for kind in ("linear", "open_vocab"):
                path = out / "tokens" / f"{cls.replace(' ', '_')}_{kind}_{n}.safetensors"
                if path.exists():
                    from opendaam.optimize import load_token

                    tokens[(kind, cls)] = load_token(path)
                    continue
                token = optimize_token([records[i.id] for i in chosen], [masks[i.id].numpy() for i in chosen],
                                       pipe=pipe, init=cls, label=cls, method=kind, epochs=cfg.optimize_epochs,
                                       image_ids=[i.id for i in chosen], progress=False)
                token.save(path)
                tokens[(kind, cls)] = token
        tokens_by_size[n] = tokens

    priors = {c: torch.stack([masks[i.id].float() for i in train[c][: cfg.report_train]]).mean(0)
              for c in cfg.classes}
    methods = ("daam", "linear", "daam_opt", "linear_opt")
    main = summarize(evaluate(test, root, methods, pipe=pipe, tokens=tokens_by_size[cfg.report_train],
                              priors=priors, thresholds=taus, records=records))
    train_vs_test = {}
    for n, tokens in tokens_by_size.items():
        used = [i for c in cfg.classes for i in train[c][:n]]
        tr = summarize(evaluate(used, root, ("daam_opt", "linear_opt"), pipe=pipe, tokens=tokens, thresholds=taus,
                                baselines=False, records=records))
        te = summarize(evaluate(test, root, ("daam_opt", "linear_opt"), pipe=pipe, tokens=tokens, thresholds=taus,
                                baselines=False, records=records))
        train_vs_test[n] = {"train": tr, "test": te}
    summary = {
        "config": asdict(cfg), "generation": call, "thresholds": taus.tolist(),
        "train_ids": {c: [i.id for i in v] for c, v in train.items()}, "test_ids": [i.id for i in test],
        "methods": main, "train_vs_test": {str(k): v for k, v in train_vs_test.items()},
    }
    write_tables(summary, out)
    return summary


def _copy_masks(items: Sequence[Item], source: Path, root: Path) -> None:
    """Copy user masks ``<id>.png`` into the dataset; list every item that has none."""
    import shutil

    missing = [i.id for i in items if not (source / f"{i.id}.png").exists()]
    if missing:
        raise FileNotFoundError(
            f"no mask <id>.png in {source} for: {', '.join(missing)}; the generated images are in "
            f"{root / 'images'} (annotate them, then rerun: finished images are not generated again)"
        )
    for i in items:
        (root / i.mask).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / f"{i.id}.png", root / i.mask)


def write_tables(summary: dict, out: str | Path) -> None:
    """Write the thesis' tables as CSV and one Markdown file, and ``summary.json``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = summary["methods"]
    classes = [c for c in next(iter(methods.values())) if c != "all"] + ["all"]
    md = []
    for key, title in (("max_miou", "Table 4.2: maximum mIoU (x100)"), ("auc", "Table 4.3: AUC (x100)")):
        header = ["class", *methods]
        rows = [[c, *[f"{methods[m][c][key]:.1f}" for m in methods]] for c in classes]
        _write_csv(out / f"{key}.csv", header, rows)
        md += [f"### {title}", "", _markdown(header, rows), ""]
    tvt = summary.get("train_vs_test", {})
    if tvt:
        for method in ("linear_opt", "daam_opt"):
            header = ["class"] + [f"{n} train: {s}" for n in tvt for s in ("train", "test")]
            rows = [[c] + [f"{tvt[n][s][method][c]['max_miou']:.1f}" for n in tvt for s in ("train", "test")]
                    for c in classes]
            _write_csv(out / f"train_vs_test_{method}.csv", header, rows)
            md += [f"### Table 4.1: {method}, max mIoU (x100) on training vs test images", "",
                   _markdown(header, rows), ""]
    (out / "tables.md").write_text("\n".join(md))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    """A small CSV file."""
    import csv

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)
