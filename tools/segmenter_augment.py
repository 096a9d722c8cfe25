"""Training-time augmentations in the synthetic-to-real experiment: do they narrow the gap?

Retrains chosen arms of a finished ``opendaam experiment segmenter`` run on its own exports (the same images,
labels, held-out scenes, budget and seed; only ``train_segmenter``'s ``augment`` hook differs) with:

* ``none``: the run's training (left-right flips only), which must repeat the run's scores;
* ``scale``: each image zoomed by a factor in [0.6, 1.2] (zoom out: a mean-colour border labelled ignore), since
  the generated objects are larger in the frame than the rendered ones (labelled area of the main object, median
  per class: 15-25% against 9-17%);
* ``sharp``: unsharp masking or blur, amount in [-1, 2] (the generated images are the VAE's soft renderings);
* ``color``: per-channel gain and a brightness shift of up to +-20%;
* ``mosaic``: half of the images replaced by a 2 x 2 mosaic of four batch images at half size, which shrinks
  objects to a quarter of their area without an ignored border.

``--negatives K`` adds K look-alike images per look-alike class (bus, truck, traffic sign), all background in
this label space: rendered scenes with their exact labels to the real set; images generated from the thesis'
template to the synthetic set, labelled background as each synthetic image's other content is (also in the
mixed arm, whose few real scenes stay as they are). The held-out scenes show look-alikes (30%), the run's
training sets none. Their seeds start at ``real_seed0 + 500_000`` and ``synthetic_seed0 + 500_000``, away from
every range the run checks.

Results are written after every arm (atomically), and a rerun skips what is there.

Usage::

    python tools/segmenter_augment.py RUN --out docs/results/segmenter/augment.json
    python tools/segmenter_augment.py RUN --out docs/results/segmenter/augment.json --modes none --negatives 16
    python tools/segmenter_augment.py RUN --out docs/results/segmenter/augment.json --modes none --seed 1

``--seed`` retrains with other weights and batch order: the spread it shows is the noise any row differs by.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from opendaam._io import atomic_write_with
from opendaam.models import generation_defaults, load_pipeline, set_threads
from opendaam.segmenter import (
    SegmenterConfig,
    check_seeds,
    evaluate_segmenter,
    load_export,
    real_labels,
    train_segmenter,
)
from opendaam.toyworld import LOOKALIKE_CLASSES
from opendaam.toyworld.scene import render_scene

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _common import cpu_model  # noqa: E402  (the measurement scripts' one CPU name: scores differ between CPUs)

MODES = ("none", "scale", "sharp", "color", "mosaic")
ARMS = ("real_only", "synthetic_only/tokens", "few_real_plus_synthetic/tokens")


def _blur(x: Tensor, sigma: float = 1.0) -> Tensor:
    """Separable 5-tap Gaussian blur of ``(N, 3, H, W)`` with replicated borders."""
    k = torch.arange(-2, 3, dtype=x.dtype)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    w = w / w.sum()
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode="replicate"), w.view(1, 1, 1, 5).expand(3, 1, 1, 5), groups=3)
    return F.conv2d(F.pad(x, (0, 0, 2, 2), mode="replicate"), w.view(1, 1, 5, 1).expand(3, 1, 5, 1), groups=3)


def _scale(x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = x.clone(), y.clone()
    height, width = x.shape[-2:]
    for i in range(len(x)):
        s = 0.6 + 0.6 * float(torch.rand((), generator=g))
        h, w = max(8, round(height * s)), max(8, round(width * s))
        xi = F.interpolate(x[i : i + 1], size=(h, w), mode="bilinear", align_corners=False)[0]  # (3, h, w)
        yi = F.interpolate(y[i : i + 1, None].float(), size=(h, w), mode="nearest")[0, 0].long()  # (h, w)
        if s >= 1:  # a random crop of the zoomed image
            top = int(torch.randint(h - height + 1, (), generator=g))
            left = int(torch.randint(w - width + 1, (), generator=g))
            x[i], y[i] = xi[:, top : top + height, left : left + width], yi[top : top + height, left : left + width]
        else:  # the smaller image at a random place on a mean-colour canvas whose pixels are ignored
            top = int(torch.randint(height - h + 1, (), generator=g))
            left = int(torch.randint(width - w + 1, (), generator=g))
            canvas = x[i].mean((1, 2), keepdim=True).expand(3, height, width).clone()
            canvas[:, top : top + h, left : left + w] = xi
            labels = torch.full((height, width), 255, dtype=y.dtype)
            labels[top : top + h, left : left + w] = yi
            x[i], y[i] = canvas, labels
    return x, y


def _mosaic(x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x, y = x.clone(), y.clone()
    n, _, height, width = x.shape
    h, w = height // 2, width // 2
    small_x = F.interpolate(x, size=(h, w), mode="area")  # (N, 3, H/2, W/2)
    small_y = y[:, : 2 * h : 2, : 2 * w : 2]  # (N, H/2, W/2), nearest: labels are not averaged
    for i in range(n):
        if float(torch.rand((), generator=g)) >= 0.5:
            continue
        picks = torch.randint(n, (4,), generator=g).tolist()
        for k, j in enumerate(picks):
            top, left = (k // 2) * h, (k % 2) * w
            x[i, :, top : top + h, left : left + w] = small_x[j]
            y[i, top : top + h, left : left + w] = small_y[j]
        y[i, 2 * h :, :] = 255  # odd sizes: the uncovered last row / column is ignored
        y[i, :, 2 * w :] = 255
    return x, y


def augmentation(mode: str):
    """The ``augment`` hook of ``train_segmenter`` for ``mode`` (``None`` for ``none``)."""
    if mode == "none":
        return None
    if mode == "scale":
        return _scale
    if mode == "sharp":
        def sharp(x, y, g):
            amount = torch.rand(len(x), 1, 1, 1, generator=g) * 3 - 1  # < 0 blurs, > 0 sharpens
            return (x + amount * (x - _blur(x))).clamp(-1, 1), y
        return sharp
    if mode == "color":
        def color(x, y, g):
            gain = 1 + (torch.rand(len(x), 3, 1, 1, generator=g) - 0.5) * 0.4
            shift = (torch.rand(len(x), 1, 1, 1, generator=g) - 0.5) * 0.4
            return (x * gain + shift).clamp(-1, 1), y
        return color
    if mode == "mosaic":
        return _mosaic
    raise ValueError(f"unknown augmentation {mode!r}; choose from {', '.join(MODES)}")


NEGATIVE_OFFSET = 500_000


Pair = tuple[np.ndarray, np.ndarray]  # (images (N, H, W, 3) uint8, labels (N, H, W) uint8)


def negatives(config: SegmenterConfig, per_class: int) -> tuple[Pair, Pair]:
    """Rendered and generated look-alike images, ``(images (K, H, W, 3) uint8, labels (K, H, W) uint8)`` each."""
    ranges = check_seeds(config)
    real_seeds = [config.real_seed0 + NEGATIVE_OFFSET + i for i in range(per_class * len(LOOKALIKE_CLASSES))]
    synthetic_seeds = [config.synthetic_seed0 + NEGATIVE_OFFSET + i for i in range(len(real_seeds))]
    for seed in real_seeds + synthetic_seeds:  # the run's own ranges and the models' seen scenes stay untouched
        hit = [name for name, (start, stop) in ranges.items() if start <= seed < stop]
        if hit:
            raise SystemExit(f"negative seed {seed} falls in {hit[0]}: change NEGATIVE_OFFSET")
    forced = [cls for cls in LOOKALIKE_CLASSES for _ in range(per_class)]
    scenes = [render_scene(seed, cls=cls) for seed, cls in zip(real_seeds, forced, strict=True)]
    real = (np.stack([np.asarray(s.image) for s in scenes]),  # (K, H, W, 3)
            np.stack([real_labels(s.labels, config.classes) for s in scenes]))  # (K, H, W)
    pipe = load_pipeline(config.model)
    kwargs = generation_defaults(pipe, num_inference_steps=config.steps, guidance_scale=config.guidance)
    images = [np.asarray(pipe(config.template.replace("{}", cls), generator=torch.Generator().manual_seed(seed),
                              **kwargs).images[0].convert("RGB"))
              for seed, cls in zip(synthetic_seeds, forced, strict=True)]
    synthetic = (np.stack(images), np.zeros((len(images), *images[0].shape[:2]), dtype=np.uint8))
    return real, synthetic


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="folder of a finished opendaam experiment segmenter run")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--negatives", type=int, default=0, metavar="K",
                        help="look-alike images per look-alike class added to the real and the synthetic set "
                             "(not to the few real scenes; 0: none)")
    parser.add_argument("--seed", type=int, default=None,
                        help="weights and batch order of every arm (default: the run's); shows seed-to-seed spread")
    args = parser.parse_args()
    if args.negatives < 0:
        raise SystemExit(f"--negatives must be >= 0, not {args.negatives}")
    summary_path = args.run / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} not found: pass the folder of a finished segmenter run")
    summary = json.loads(summary_path.read_text())
    config = SegmenterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    if args.seed is not None and args.seed != config.seed:
        config, suffix = replace(config, seed=args.seed), f"@seed{args.seed}"
    else:
        suffix = ""
    set_threads(config.threads or 2)
    cache = args.run / "cache"
    real = load_export(args.run / "real" / "train" / "huggingface", cache)
    test = load_export(args.run / "real" / "test" / "huggingface", cache)
    tokens = load_export(args.run / "synthetic" / "tokens" / "huggingface", cache)
    few = tuple(part[: config.few_real] for part in real)
    if args.negatives:
        (real_neg, synthetic_neg), suffix = negatives(config, args.negatives), f"+neg{args.negatives}{suffix}"
        real, tokens = (tuple(np.concatenate(pair) for pair in zip(part, neg, strict=True))
                        for part, neg in ((real, real_neg), (tokens, synthetic_neg)))
    sets = {"real_only": [real], "synthetic_only/tokens": [tokens], "few_real_plus_synthetic/tokens": [few, tokens]}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"run": str(args.run), "scores": {}}
    result.setdefault("machine", {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()})
    def save() -> None:  # after every arm, atomically: a rerun skips what is written
        atomic_write_with(args.out, lambda p: p.write_text(json.dumps(result, indent=1)))

    miou = summary["miou"]
    result["run_miou"] = {"real_only": miou["real_only"], "synthetic_only/tokens": miou["synthetic_only"]["tokens"],
                          "few_real_plus_synthetic/tokens": miou["few_real_plus_synthetic"]["tokens"]}
    for mode in args.modes:
        for arm in args.arms:
            key = f"{mode}{suffix}:{arm}"
            if key in result["scores"]:
                continue
            start = time.perf_counter()
            model = train_segmenter(sets[arm], config, augment=augmentation(mode))
            score = evaluate_segmenter(model, *test, config.classes)
            result["scores"][key] = {"miou": score["miou"], "iou": score["iou"],
                                     "seconds": round(time.perf_counter() - start, 1)}
            print(key, score["miou"], flush=True)
            save()
    save()
    real_only = {m: result["scores"].get(f"{m}:real_only", {}).get("miou") for m in MODES}
    for mode in MODES:
        synth = result["scores"].get(f"{mode}:synthetic_only/tokens", {}).get("miou")
        if synth is not None and real_only[mode]:
            print(f"{mode}: tokens / real only = {synth / real_only[mode]:.2f}")


if __name__ == "__main__":
    main()
