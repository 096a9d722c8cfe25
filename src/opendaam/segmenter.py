"""The synthetic-to-real experiment: do opendaam's labels train a segmenter that works on real images?

On toy-urban, rendered scenes with exact Cityscapes labels stand in for real annotated data and generated
images labelled by opendaam are the synthetic data. One run trains the same SegFormer (Hugging Face
transformers, a small configuration, random initialization) with the same budget on several training sets
("arms") and scores each on held-out rendered scenes:

* ``real_only``: N rendered scenes with exact labels;
* ``synthetic_only/<labeller>``: N generated images labelled by one labeller (:data:`LABELLERS`);
* ``few_real``: a small real set alone;
* ``few_real_plus_synthetic/<labeller>``: the small real set with a synthetic set (half of every batch each).

Every training set goes through opendaam's Hugging Face export and is read back with ``datasets``, as a user
would: the synthetic sets are made by :func:`opendaam.dataset.generate.generate` from a dataset spec per
labeller, the real sets are written with the same exporter.

Seeds are disjoint by construction and checked (:func:`check_seeds`): the held-out scenes share no seed with
the scenes the diffusion model or the annotator net were trained on, the real training scenes, the scenes
the tokens were optimized on, or the synthetic images' generation seeds.

Everything a run finishes is kept: the real sets, tokens, synthetic datasets and each arm's weights and
scores are written atomically; a rerun with the same configuration skips them.

Eighth layer of opendaam (beside experiments and datasets): imports models, tracing, optimize, metrics,
experiments, dataset and toyworld; never viz or cli.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from opendaam._io import atomic_write_with
from opendaam.dataset.io import atomic_write, png_bytes
from opendaam.experiments import TEMPLATE, THESIS_CLASSES
from opendaam.metrics import class_confusion, iou_score

__all__ = [
    "LABELLERS",
    "SegmenterConfig",
    "arm_names",
    "check_config",
    "check_seeds",
    "evaluate_segmenter",
    "labeller_spec",
    "load_export",
    "real_labels",
    "run_segmenter",
    "seen_seeds",
    "segformer",
    "train_segmenter",
    "write_real_set",
    "write_segmenter_tables",
]

LABELLERS = ("daam", "refined", "tokens")
"""Synthetic labellers, each adding to the one before: DAAM maps with the fixed confidence band; the same maps
refined through self-attention with adaptive (Otsu) thresholds; optimized class tokens instead of the class
words, refined and thresholded the same way."""


@dataclass(frozen=True)
class SegmenterConfig:
    """One run of the synthetic-to-real experiment (defaults: about 15 minutes on 2 CPU cores).

    Examples:
        >>> cfg = SegmenterConfig(train_per_class=2, few_real_per_class=1, test_size=4)
        >>> cfg.train_size, cfg.few_real, arm_names(cfg)[:2]
        (8, 4, ['real_only', 'synthetic_only/daam'])
    """

    classes: tuple[str, ...] = THESIS_CLASSES  # the thesis' label space; every other pixel is background (0)
    model: str = "toy-urban"  # the model's name in the synthetic sets' specs (the pipeline passed is used)
    train_per_class: int = 32  # N / classes: the real set and each synthetic set hold N images (equal N)
    few_real_per_class: int = 4  # the small real set: 16 scenes for the thesis' four classes
    test_size: int = 256  # held-out scenes drawn as the world draws them (30% show a look-alike, all background)
    labellers: tuple[str, ...] = LABELLERS  # the synthetic sets, one per labeller
    template: str = TEMPLATE  # the thesis' prompt for the synthetic images
    steps: int | None = None  # denoising steps; None: the model's own
    guidance: float | None = None  # guidance scale; None: the model's own
    refine_layers: tuple[str, ...] = ("down_blocks.1", "up_blocks.1")  # toy-urban's 8x8 self-attention: the
    # best refinement measured (docs/results/toy-refinement.json); the 16x16 layers made labels worse
    refine_power: int = 1  # one propagation step; more washed the maps out on toy-urban
    token_per_class: int = 5  # img2img scenes with exact masks a class token is optimized on
    token_method: str = "linear"  # the thesis' best optimized maps (linear_opt 60.6 vs daam_opt 55.6 mIoU)
    token_epochs: int = 300  # the optimizer's default budget
    tokens: str | None = None  # folder of ready tokens <class>.safetensors (opendaam optimize); None: optimize
    min_confidence: float | None = None  # the specs' filter: drop weaker synthetic masks; None keeps N equal
    strength: float = 0.5  # img2img strength of the token scenes (keeps their exact labels in place)
    train_steps: int = 1000  # optimizer steps of every arm: the same budget whatever the set's size
    batch: int = 16  # images per step
    lr: float = 3e-3  # AdamW's start rate, cosine decay to 0: beat 1e-3 on every arm tried (docs/segmenter.md)
    hidden_sizes: tuple[int, ...] = (32, 64, 128, 256)  # SegFormer-B0 widths; 1.6 M weights at depth 1
    depths: tuple[int, ...] = (1, 1, 1, 1)  # one block per stage: 64 px scenes need no depth
    decoder_size: int = 128  # the all-MLP decoder's width
    seed: int = 0  # weights and batch order; the same for every arm
    real_seed0: int = 30_000_000  # first scene seed of the real training set
    token_seed0: int = 31_000_000  # first scene seed of the token scenes
    synthetic_seed0: int = 32_000_000  # first generation seed of the synthetic images
    test_seed0: int = 33_000_000  # first scene seed of the held-out set
    threads: int | None = None  # torch threads; None: torch's choice

    @property
    def train_size(self) -> int:
        """N: images in the real set and in each synthetic set."""
        return self.train_per_class * len(self.classes)

    @property
    def few_real(self) -> int:
        """Images in the small real set."""
        return self.few_real_per_class * len(self.classes)


def arm_names(config: SegmenterConfig) -> list[str]:
    """The training sets of a run, in the order they are trained and tabulated."""
    return (["real_only"] + [f"synthetic_only/{name}" for name in config.labellers] + ["few_real"]
            + [f"few_real_plus_synthetic/{name}" for name in config.labellers])


# -- seeds ------------------------------------------------------------------------------------------------


def seen_seeds() -> dict[str, range]:
    """Scene seeds toy-urban's diffusion model and annotator net were trained or evaluated on.

    Examples:
        >>> seen_seeds()["diffusion model training"]
        range(0, 8000)
    """
    from opendaam.toyworld.annotate import HELD_OUT_ANNOTATOR
    from opendaam.toyworld.train import HELD_OUT, TrainConfig

    cfg = TrainConfig()
    return {
        "diffusion model training": range(cfg.scenes),
        "diffusion model evaluation": range(HELD_OUT, HELD_OUT + cfg.eval_scenes),
        "annotator training": range(4000),  # train_annotator's default scenes
        "annotator evaluation": range(HELD_OUT_ANNOTATOR, HELD_OUT_ANNOTATOR + 256),
    }


def _seed_ranges(config: SegmenterConfig) -> dict[str, range]:
    """The seeds a run uses, by purpose."""
    per_class = config.train_per_class
    return {
        "real training scenes": range(config.real_seed0, config.real_seed0 + config.train_size),
        "token scenes": range(config.token_seed0, config.token_seed0 + config.token_per_class * len(config.classes)),
        "synthetic generation": range(config.synthetic_seed0, config.synthetic_seed0 + per_class),
        "held-out scenes": range(config.test_seed0, config.test_seed0 + config.test_size),
    }


def check_seeds(config: SegmenterConfig) -> dict[str, list[int]]:
    """Check that the held-out seeds overlap no other seed of the run or of the models' training, and that the
    run's own training seeds avoid the models' training scenes; returns every range as ``[start, stop)``.

    Raises:
        ValueError: two ranges overlap; the message names them and the option to move.

    Examples:
        >>> check_seeds(SegmenterConfig(test_seed0=0))
        Traceback (most recent call last):
        ValueError: held-out scenes [0, 256) overlap diffusion model training [0, 8000): move test_seed0
    """
    own = _seed_ranges(config)
    options = {"real training scenes": "real_seed0", "token scenes": "token_seed0",
               "synthetic generation": "synthetic_seed0", "held-out scenes": "test_seed0"}
    pairs = [("held-out scenes", name, rng) for name, rng in {**seen_seeds(), **own}.items()
             if name != "held-out scenes"]
    pairs += [(name, seen, rng) for name in ("real training scenes", "token scenes")
              for seen, rng in seen_seeds().items()]
    for name, other, rng in pairs:
        mine = own[name]
        if mine.start < rng.stop and rng.start < mine.stop:
            raise ValueError(f"{name} [{mine.start}, {mine.stop}) overlap {other} [{rng.start}, {rng.stop}): "
                             f"move {options[name]}")
    return {name: [rng.start, rng.stop] for name, rng in {**own, **seen_seeds()}.items()}


# -- data -------------------------------------------------------------------------------------------------


def real_labels(labels: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """Label ids of the experiment (0 background, class ``k`` is ``k + 1``) from a Cityscapes label map.

    Examples:
        >>> from opendaam.toyworld.scene import LABEL_IDS
        >>> real_labels(np.array([[LABEL_IDS["car"], LABEL_IDS["road"], LABEL_IDS["rider"]]]), ["car", "rider"])
        array([[1, 0, 2]], dtype=uint8)
    """
    from opendaam.toyworld.scene import class_mask

    out = np.zeros(labels.shape, dtype=np.uint8)  # (H, W)
    for k, name in enumerate(classes):
        out[class_mask(labels, name)] = k + 1
    return out


def _class_table(classes: Sequence[str]) -> list[dict]:
    return [{"id": k + 1, "name": name} for k, name in enumerate(classes)]


def write_real_set(out: str | Path, seeds: Sequence[int], classes: Sequence[str],
                   forced: Sequence[str | None] | None = None) -> Path:
    """Render scenes with their exact labels and write them as opendaam's Hugging Face export under ``out``.

    Args:
        out: folder; ``images/``, ``labels/`` and ``huggingface/`` are written in it.
        seeds: scene seeds.
        classes: the label space, in label-id order.
        forced: per seed, the main object's class (None: the world's own draw).

    Returns:
        The export folder (``out/huggingface``), written last: a folder with it is complete.

    Examples:
        >>> import tempfile
        >>> path = write_real_set(tempfile.mkdtemp(), [40_000_000], ["car"], forced=["car"])
        >>> images, labels = load_export(path)
        >>> images.shape, labels.dtype, sorted(np.unique(labels).tolist())
        ((1, 64, 64, 3), dtype('uint8'), [0, 1])
    """
    from opendaam.dataset.cityscapes import label_palette
    from opendaam.dataset.export import export_huggingface
    from opendaam.toyworld.scene import render_scene

    out = Path(out)
    table = _class_table(classes)
    palette = label_palette(classes=table)
    entries = []
    for index, seed in enumerate(seeds):
        scene = render_scene(int(seed), cls=forced[index] if forced is not None else None)
        files = {"image": f"images/{index:06d}.png", "label": f"labels/{index:06d}.png"}
        atomic_write(out / files["image"], png_bytes(scene.image))
        atomic_write(out / files["label"], png_bytes(real_labels(scene.labels, classes), palette))
        entries.append({"files": files, "prompt": scene.caption, "seed": int(seed), "index": index})
    export_huggingface(out, entries, table, name=out.name)
    return out / "huggingface"


def load_export(path: str | Path, cache_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, H, W, 3)`` and label ids ``(N, H, W)`` of an opendaam Hugging Face export, read with
    ``datasets.load_dataset`` as a user's trainer reads it.

    Raises:
        ImportError: the datasets package is missing (names the extra).
        ValueError: the export holds no image.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError("the segmenter experiment reads Hugging Face exports: pip install "
                          "'opendaam[huggingface]'") from error
    table = datasets.load_dataset(str(path), split="train", cache_dir=None if cache_dir is None else str(cache_dir))
    if len(table) == 0:
        raise ValueError(f"the export {path} holds no image")
    images = np.stack([np.asarray(row["image"].convert("RGB")) for row in table])  # (N, H, W, 3)
    labels = np.stack([np.asarray(row["label"]) for row in table]).astype(np.uint8)  # (N, H, W)
    return images, labels


def labeller_spec(name: str, config: SegmenterConfig, tokens: dict[str, Path] | None = None) -> dict:
    """The dataset spec (as a mapping for :func:`opendaam.dataset.spec.parse_spec`) of a synthetic set.

    Raises:
        ValueError: an unknown labeller (names the valid ones), or ``tokens`` lacks a class' token file.

    Examples:
        >>> labeller_spec("refined", SegmenterConfig(classes=("car",)))["refine"]
        {'layers': ['down_blocks.1', 'up_blocks.1'], 'power': 1}
    """
    if name not in LABELLERS:
        raise ValueError(f"unknown labeller {name!r}; choose from {', '.join(LABELLERS)}")
    classes = [{"name": cls, "prompts": [config.template.replace("{}", "{" + cls + "}")]} for cls in config.classes]
    spec = {
        "name": f"segmenter-{name}", "model": config.model, "steps": config.steps, "guidance": config.guidance,
        "seeds": {"start": config.synthetic_seed0, "count": config.train_per_class},
        "method": "daam", "classes": classes, "outputs": {"formats": ["huggingface"]},
        "filter": {"min_confidence": config.min_confidence},
    }
    if name != "daam":
        spec["refine"] = {"layers": list(config.refine_layers), "power": config.refine_power}
        spec["thresholds"] = {"mode": "adaptive"}
    if name == "tokens":
        tokens = tokens or {}
        missing = [cls for cls in config.classes if cls not in tokens]
        if missing:
            raise ValueError(f"the tokens labeller has no token file for {', '.join(missing)}")
        spec["method"] = config.token_method
        for entry in classes:
            entry["token"] = str(tokens[entry["name"]])
    return spec


def _token_file(cls: str) -> str:
    return cls.replace(" ", "_") + ".safetensors"


def _given_tokens(config: SegmenterConfig) -> dict[str, Path] | None:
    """The ready token files of ``config.tokens``, checked; None when tokens are to be optimized."""
    if config.tokens is None:
        return None
    folder = Path(config.tokens)
    found = {cls: folder / _token_file(cls) for cls in config.classes}
    missing = [f"{cls} ({path})" for cls, path in found.items() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"no token file for {', '.join(missing)}: make them with opendaam optimize, or "
                                "leave out --tokens to optimize them in the run")
    return found


def _optimize_tokens(pipe, out: Path, config: SegmenterConfig, progress: bool) -> dict[str, Path]:
    """Optimize one token per class on img2img scenes with exact masks (kept: a rerun loads them)."""
    from diffusers import AutoPipelineForImage2Image

    from opendaam.cache import load_record
    from opendaam.experiments import ToyWorldAnnotator, generate_items, read_mask
    from opendaam.optimize import optimize_token

    paths = {cls: out / _token_file(cls) for cls in config.classes}
    if all(p.exists() for p in paths.values()):
        return paths
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    img2img.set_progress_bar_config(disable=True)
    call = _call(pipe, config, size=False)
    items = generate_items(img2img, out / "scenes", config.classes, config.token_per_class,
                           annotator=ToyWorldAnnotator(config.strength), seed0=config.token_seed0, call=call,
                           progress=progress)
    for cls, path in paths.items():
        if path.exists():
            continue
        chosen = [i for i in items if i.cls == cls]
        records = [load_record(out / "scenes" / i.record) for i in chosen]
        masks = [read_mask(out / "scenes" / i.mask, r.image_size).numpy() for i, r in zip(chosen, records,
                                                                                           strict=True)]
        token = optimize_token(records, masks, pipe=pipe, init=cls, label=cls, method=config.token_method,
                               epochs=config.token_epochs, image_ids=[i.id for i in chosen], progress=False)
        token.save(path)
    return paths


def _call(pipe, config: SegmenterConfig, size: bool = True) -> dict:
    from opendaam.models import generation_defaults

    defaults = generation_defaults(pipe, num_inference_steps=config.steps, guidance_scale=config.guidance)
    return {k: v for k, v in defaults.items() if size or k not in ("height", "width")}


# -- the segmenter ----------------------------------------------------------------------------------------


def segformer(config: SegmenterConfig):
    """A randomly initialized SegFormer for the experiment's label space (classes + background).

    Examples:
        >>> model = segformer(SegmenterConfig(hidden_sizes=(8, 16, 32, 64), decoder_size=16))
        >>> model.config.num_labels, model.config.id2label[1]
        (5, 'car')
    """
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    names = ["background", *config.classes]
    heads = [max(1, size // 32) for size in config.hidden_sizes]  # 32 channels a head, as SegFormer-B0
    model_config = SegformerConfig(
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: k for k, n in enumerate(names)},
        hidden_sizes=list(config.hidden_sizes), depths=list(config.depths), num_attention_heads=heads,
        decoder_hidden_size=config.decoder_size, semantic_loss_ignore_index=255)
    torch.manual_seed(config.seed)
    return SegformerForSemanticSegmentation(model_config)


def _pixels(images: np.ndarray) -> Tensor:
    """uint8 ``(N, H, W, 3)`` to the model's input ``(N, 3, H, W)`` in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)  # (N, 3, H, W)


def train_segmenter(sets: Sequence[tuple[np.ndarray, np.ndarray]], config: SegmenterConfig,
                    progress: Callable[[int, float], None] | None = None,
                    augment: Callable[[Tensor, Tensor, torch.Generator], tuple[Tensor, Tensor]] | None = None):
    """Train :func:`segformer` on one or more ``(images, labels)`` sets for ``config.train_steps`` steps.

    With two sets every batch draws half its images from each (a small real set is not drowned by a large
    synthetic one); images are flipped left-right at random. AdamW, cosine decay, pixel cross-entropy that
    skips label 255.

    Args:
        sets: ``(images (N, H, W, 3) uint8, labels (N, H, W) uint8)`` per set.
        config: sizes and budget.
        progress: called with ``(step, loss)`` after every step.
        augment: called on every batch after the flips as ``augment(x, y, generator)`` with images
            ``(batch, 3, H, W)`` in [-1, 1] and labels ``(batch, H, W)`` (255: ignore); returns the pair to
            train on. Draw randomness from ``generator`` to keep runs deterministic.

    Returns:
        The trained model (eval mode).

    Examples:
        >>> cfg = SegmenterConfig(hidden_sizes=(8, 16, 32, 64), decoder_size=16, train_steps=2, batch=2)
        >>> images = np.zeros((3, 32, 32, 3), np.uint8); labels = np.zeros((3, 32, 32), np.uint8)
        >>> train_segmenter([(images, labels)], cfg).training
        False
    """
    model = segformer(config)
    model.train()
    generator = torch.Generator().manual_seed(config.seed)
    data = [(_pixels(images), torch.from_numpy(labels.astype(np.int64))) for images, labels in sets]
    shares = [config.batch // len(data) + (k < config.batch % len(data)) for k in range(len(data))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.train_steps)
    for step in range(config.train_steps):
        xs, ys = [], []
        for (x, y), share in zip(data, shares, strict=True):
            pick = torch.randint(len(x), (share,), generator=generator)
            xs.append(x[pick])
            ys.append(y[pick])
        x, y = torch.cat(xs), torch.cat(ys)  # (batch, 3, H, W), (batch, H, W)
        flip = torch.rand(len(x), generator=generator) < 0.5
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)
        if augment is not None:
            x, y = augment(x, y, generator)
        loss = model(pixel_values=x, labels=y).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, loss.item())
    return model.eval()


@torch.no_grad()
def evaluate_segmenter(model, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                       batch: int = 64) -> dict:
    """Score a segmenter on labelled images: per-class IoU and mIoU (x100) from dataset-level counts.

    Returns:
        ``{"miou", "iou": {name: value}, "confusion": [[tp, fp, fn, tn], ...]}``; a class absent from both the
        labels and the predictions has IoU None and is left out of the mean.

    Examples:
        >>> cfg = SegmenterConfig(classes=("car",), hidden_sizes=(8, 16, 32, 64), decoder_size=16)
        >>> images = np.zeros((2, 32, 32, 3), np.uint8); labels = np.zeros((2, 32, 32), np.uint8)
        >>> sorted(evaluate_segmenter(segformer(cfg).eval(), images, labels, cfg.classes))
        ['confusion', 'iou', 'miou']
    """
    names = ["background", *classes]
    counts = torch.zeros(len(names), 4, dtype=torch.long)
    for start in range(0, len(images), batch):
        x = _pixels(images[start : start + batch])  # (b, 3, H, W)
        logits = model(pixel_values=x).logits  # (b, classes + 1, H / 4, W / 4)
        logits = torch.nn.functional.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)  # (b, H, W)
        counts += class_confusion(pred, torch.from_numpy(labels[start : start + batch]), len(names))
    iou = iou_score(counts)  # (classes + 1,)
    values = {name: (None if math.isnan(v) else round(100 * v, 2)) for name, v in zip(names, iou.tolist(),
                                                                                       strict=True)}
    scored = [v for v in values.values() if v is not None]
    return {"miou": round(sum(scored) / len(scored), 2), "iou": values, "confusion": counts.tolist()}


# -- the run ----------------------------------------------------------------------------------------------


@dataclass
class _Stage:
    """Wall time per stage of a run (only the work done in this call; finished stages cost 0)."""

    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, started: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - started, 2)


def check_config(config: SegmenterConfig, out: str | Path | None = None) -> None:
    """Bad options, a missing token file or a folder of another run, before any work: one line naming it.

    Examples:
        >>> check_config(SegmenterConfig(labellers=("dam",)))
        Traceback (most recent call last):
        ValueError: unknown labeller 'dam'; choose from daam, refined, tokens
    """
    for name in ("train_per_class", "test_size", "token_per_class", "token_epochs", "train_steps", "batch"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    if not 1 <= config.few_real_per_class <= config.train_per_class:
        raise ValueError(f"few_real_per_class must be between 1 and train_per_class ({config.train_per_class}), "
                         f"got {config.few_real_per_class}")
    if not config.labellers:
        raise ValueError("labellers is empty; choose some of " + ", ".join(LABELLERS))
    unknown = [name for name in config.labellers if name not in LABELLERS]
    if unknown:
        raise ValueError(f"unknown labeller {unknown[0]!r}; choose from {', '.join(LABELLERS)}")
    if not config.classes or len(set(config.classes)) != len(config.classes):
        raise ValueError(f"classes must be distinct names, got {list(config.classes)}")
    from opendaam.toyworld.scene import CLASSES

    outside = [c for c in config.classes if c not in CLASSES]
    if outside:
        raise ValueError(f"the toy world draws no {outside[0]!r}; classes come from {', '.join(CLASSES)}")
    if config.token_method not in ("linear", "open_vocab"):
        raise ValueError(f"token_method must be 'linear' or 'open_vocab', got {config.token_method!r}")
    if not config.lr > 0:
        raise ValueError(f"lr must be positive, got {config.lr}")
    if config.min_confidence is not None and not 0.0 <= config.min_confidence <= 1.0:
        raise ValueError(f"min_confidence must be in [0, 1], got {config.min_confidence}")
    check_seeds(config)
    if "tokens" in config.labellers:
        _given_tokens(config)
    if out is not None:
        _check_folder(Path(out), config)


def _check_folder(out: Path, config: SegmenterConfig) -> None:
    """A folder of another configuration's run is refused (its finished parts would be mixed in)."""
    path = out / "config.json"
    if not path.exists():
        return
    before = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(config)))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k) and k != "threads")
    if changed:
        raise ValueError(f"{out} holds a run with other settings ({', '.join(changed)}); use another --out "
                         "or the same settings to resume it")


def run_segmenter(pipe, out: str | Path, config: SegmenterConfig | None = None, *, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """Run the synthetic-to-real experiment; writes ``summary.json``, ``tables.md`` and ``miou.csv`` in ``out``.

    Args:
        pipe: the toy-urban text-to-image pipeline (its img2img twin is made for the token scenes).
        out: output folder; a rerun with the same configuration resumes it.
        config: :class:`SegmenterConfig`.
        progress: show progress bars.
        log: called with one line per finished stage.

    Returns:
        The summary (also in ``summary.json``): ``miou`` per arm (``real_only``, ``synthetic_only`` per
        labeller, ``few_real``, ``few_real_plus_synthetic`` per labeller), per-class ``iou``, ``targets``,
        ``sizes``, ``seeds``, ``time_s``.

    Raises:
        ValueError: bad options or a folder of another run, before any work; a synthetic set with no image
            left after its spec's filters, before any segmenter trains.
    """
    from tqdm.auto import tqdm

    from opendaam.dataset.generate import generate
    from opendaam.dataset.spec import parse_spec

    config = config or SegmenterConfig()
    out = Path(out)
    check_config(config, out)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    stage = _Stage()
    atomic_write(out / "config.json", json.dumps(asdict(config), indent=1) + "\n")
    seeds = check_seeds(config)
    cache = out / "cache"

    t = time.perf_counter()
    forced = [config.classes[i % len(config.classes)] for i in range(config.train_size)]  # class-balanced
    real_path = out / "real" / "train" / "huggingface"
    if not (real_path / "README.md").exists():
        write_real_set(out / "real" / "train", range(config.real_seed0, config.real_seed0 + config.train_size),
                       config.classes, forced)
    test_path = out / "real" / "test" / "huggingface"
    if not (test_path / "README.md").exists():
        write_real_set(out / "real" / "test", range(config.test_seed0, config.test_seed0 + config.test_size),
                       config.classes)
    stage.add("real sets", t)

    tokens = None
    if "tokens" in config.labellers:
        t = time.perf_counter()
        tokens = _given_tokens(config) or _optimize_tokens(pipe, out / "tokens", config, progress)
        stage.add("tokens", t)
        log(f"tokens: {', '.join(str(p) for p in tokens.values())}")

    synthetic_paths = {}
    for name in config.labellers:
        t = time.perf_counter()
        spec = parse_spec(labeller_spec(name, config, tokens))
        folder = out / "synthetic" / name
        generate(spec, folder, pipe=pipe, progress=progress)
        synthetic_paths[name] = folder / "huggingface"
        stage.add(f"synthetic {name}", t)
    sets = {"real": load_export(real_path, cache), "test": load_export(test_path, cache)}
    for name, path in synthetic_paths.items():
        try:
            sets[name] = load_export(path, cache)
        except (ValueError, FileNotFoundError, OSError):
            raise ValueError(f"the {name} labeller's synthetic set {path.parent} has no image left after its "
                             "filters; loosen the spec's filter or generate more images") from None
    log(f"data: real {len(sets['real'][0])}, test {len(sets['test'][0])}, "
        + ", ".join(f"{n} {len(sets[n][0])}" for n in config.labellers))
    few = tuple(part[: config.few_real] for part in sets["real"])  # class-balanced: the first 4 per class

    arms = {}
    for arm in arm_names(config):
        kind, _, labeller = arm.partition("/")
        train = {"real_only": [sets["real"]], "synthetic_only": [sets.get(labeller)], "few_real": [few],
                 "few_real_plus_synthetic": [few, sets.get(labeller)]}[kind]
        arms[arm] = _run_arm(out / "arms" / arm.replace("/", "-"), train, sets["test"], config, arm, progress,
                             tqdm, stage)
        log(f"{arm}: mIoU {arms[arm]['miou']:.1f} ({arms[arm]['train_images']} training images)")

    summary = _summary(config, arms, sets, seeds, stage, time.perf_counter() - started)
    atomic_write(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    write_segmenter_tables(summary, out)
    return summary


def _run_arm(folder: Path, train: list, test: tuple[np.ndarray, np.ndarray], config: SegmenterConfig, arm: str,
             progress: bool, tqdm, stage: _Stage) -> dict:
    """Train and score one arm, or read its finished result."""
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    t = time.perf_counter()
    bar = tqdm(total=config.train_steps, desc=arm, unit="step", disable=not progress)

    def tick(step: int, loss: float) -> None:
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.3f}")

    model = train_segmenter(train, config, progress=tick)
    bar.close()
    trained = time.perf_counter()
    result = evaluate_segmenter(model, *test, config.classes)
    from safetensors.torch import save_file

    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write_with(folder / "model.safetensors", lambda p: save_file(weights, str(p)))
    result.update(train_images=sum(len(images) for images, _ in train), train_s=round(trained - t, 2),
                  evaluate_s=round(time.perf_counter() - trained, 2))
    atomic_write(result_path, json.dumps(result, indent=1) + "\n")  # last: the arm counts as done
    stage.add("segmenters", t)
    return result


def _summary(config: SegmenterConfig, arms: dict, sets: dict, seeds: dict, stage: _Stage, total: float) -> dict:
    """The run's summary: mIoU per arm in the issue's layout, per-class IoU, targets, sizes, seeds, time."""
    miou: dict = {"real_only": arms["real_only"]["miou"], "synthetic_only": {}, "few_real": arms["few_real"]["miou"],
                  "few_real_plus_synthetic": {}}
    for name in config.labellers:
        miou["synthetic_only"][name] = arms[f"synthetic_only/{name}"]["miou"]
        miou["few_real_plus_synthetic"][name] = arms[f"few_real_plus_synthetic/{name}"]["miou"]
    best = max(miou["synthetic_only"], key=miou["synthetic_only"].get)
    labelled = {}
    for name in config.labellers:
        labels = sets[name][1]
        labelled[name] = {"images": len(labels), "ignored": round(float((labels == 255).mean()), 4),
                          "class_pixels": round(float(((labels > 0) & (labels < 255)).mean()), 4)}
    return {
        "miou": miou,
        "iou": {arm: result["iou"] for arm, result in arms.items()},
        "targets": {
            "best_synthetic": best,
            "synthetic_over_real": round(miou["synthetic_only"][best] / max(miou["real_only"], 1e-9), 3),
            "few_real_gain": {n: round(v - miou["few_real"], 2) for n, v in miou["few_real_plus_synthetic"].items()},
        },
        "sizes": {"train": config.train_size, "few_real": config.few_real, "test": len(sets["test"][0]),
                  "token_scenes": config.token_per_class * len(config.classes) if "tokens" in config.labellers else 0,
                  "synthetic": labelled,
                  "real_class_pixels": round(float((sets["real"][1] > 0).mean()), 4),
                  "test_class_pixels": round(float((sets["test"][1] > 0).mean()), 4)},
        "seeds": seeds,
        "time_s": {"total": round(total, 1), **stage.seconds,
                   "arms": {arm: result["train_s"] for arm, result in arms.items()}},
        "config": asdict(config),
        "units": "IoU and mIoU in percent; mIoU is the mean over background and the classes",
    }


def write_segmenter_tables(summary: dict, out: str | Path) -> None:
    """``tables.md`` (mIoU and per-class IoU per arm, the targets) and ``miou.csv`` from a summary."""
    out = Path(out)
    arms = list(summary["iou"])
    names = list(next(iter(summary["iou"].values())))
    rows = []
    for arm in arms:
        kind, _, labeller = arm.partition("/")
        value = summary["miou"][kind][labeller] if labeller else summary["miou"][kind]
        cells = [("" if summary["iou"][arm][n] is None else f"{summary['iou'][arm][n]:.1f}") for n in names]
        rows.append([arm, f"{value:.1f}", *cells])
    header = ["training set", "mIoU", *names]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    targets = summary["targets"]
    sizes = summary["sizes"]
    text = "\n".join([
        "# Synthetic-to-real segmentation (toy-urban)", "",
        f"SegFormer trained from scratch on each set for the same number of steps, scored on {sizes['test']} "
        f"held-out rendered scenes; N = {sizes['train']}, few real = {sizes['few_real']}. IoU in percent.", "",
        *table, "",
        f"- best synthetic labeller: {targets['best_synthetic']}, {targets['synthetic_over_real']:.2f} x real only "
        "(goal: >= 0.8)",
        "- few real + synthetic minus few real: " + ", ".join(
            f"{n} {v:+.1f}" for n, v in targets["few_real_gain"].items()) + " mIoU points (goal: >= +5)",
        f"- time: {summary['time_s']['total']:.0f} s", "",
    ])
    atomic_write(out / "tables.md", text)
    csv = [",".join(header)] + [",".join(row) for row in rows]
    atomic_write(out / "miou.csv", "\n".join(csv) + "\n")
