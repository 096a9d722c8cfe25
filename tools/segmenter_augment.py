"""Training-time augmentations in the synthetic-to-real experiment: do they narrow the gap?

Retrains chosen arms of a finished ``opendaam experiment segmenter`` run on its own exports (the same images,
labels, held-out scenes, budget and seed; only ``train_segmenter``'s ``augment`` hook differs) with:

* ``none``: the run's training (left-right flips only), which must repeat the run's scores;
* ``scale``: each image zoomed by a factor in [0.6, 1.2] (zoom out: a mean-colour border labelled ignore), since
  the generated objects are larger in the frame than the rendered ones;
* ``sharp``: unsharp masking or blur, amount in [-1, 2] (the generated images are the VAE's soft renderings);
* ``color``: per-channel gain and a brightness shift of up to +-20%.

Results are written after every arm (atomically), and a rerun skips what is there.

Usage::

    python tools/segmenter_augment.py RUN --out docs/results/segmenter/augment.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from opendaam._io import atomic_write_with
from opendaam.models import set_threads
from opendaam.segmenter import SegmenterConfig, evaluate_segmenter, load_export, train_segmenter

MODES = ("none", "scale", "sharp", "color")
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
    raise ValueError(f"unknown augmentation {mode!r}; choose from {', '.join(MODES)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="folder of a finished opendaam experiment segmenter run")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    summary_path = args.run / "summary.json"
    if not summary_path.is_file():
        raise SystemExit(f"{summary_path} not found: pass the folder of a finished segmenter run")
    summary = json.loads(summary_path.read_text())
    config = SegmenterConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in summary["config"].items()})
    set_threads(config.threads or 2)
    cache = args.run / "cache"
    real = load_export(args.run / "real" / "train" / "huggingface", cache)
    test = load_export(args.run / "real" / "test" / "huggingface", cache)
    tokens = load_export(args.run / "synthetic" / "tokens" / "huggingface", cache)
    few = tuple(part[: config.few_real] for part in real)
    sets = {"real_only": [real], "synthetic_only/tokens": [tokens], "few_real_plus_synthetic/tokens": [few, tokens]}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"run": str(args.run), "scores": {}}
    miou = summary["miou"]
    result["run_miou"] = {"real_only": miou["real_only"], "synthetic_only/tokens": miou["synthetic_only"]["tokens"],
                          "few_real_plus_synthetic/tokens": miou["few_real_plus_synthetic"]["tokens"]}
    for mode in args.modes:
        for arm in args.arms:
            key = f"{mode}:{arm}"
            if key in result["scores"]:
                continue
            start = time.perf_counter()
            model = train_segmenter(sets[arm], config, augment=augmentation(mode))
            score = evaluate_segmenter(model, *test, config.classes)
            result["scores"][key] = {"miou": score["miou"], "iou": score["iou"],
                                     "seconds": round(time.perf_counter() - start, 1)}
            print(key, score["miou"], flush=True)
            atomic_write_with(args.out, lambda p: p.write_text(json.dumps(result, indent=1)))
    real_only = {m: result["scores"].get(f"{m}:real_only", {}).get("miou") for m in MODES}
    for mode in MODES:
        synth = result["scores"].get(f"{mode}:synthetic_only/tokens", {}).get("miou")
        if synth is not None and real_only[mode]:
            print(f"{mode}: tokens / real only = {synth / real_only[mode]:.2f}")


if __name__ == "__main__":
    main()
