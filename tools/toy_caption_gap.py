"""Caption gap of the toy-urban weights at t = 500, split into object and background latent pixels.

The issue's gate compares the denoising MSE of the right caption with a wrong-class and an empty caption
over whole latents (``opendaam.toyworld.train.caption_gap``, which this reproduces exactly). Here the same
squared errors are also averaged over the pixels of the main object (its ground-truth mask pooled to the
16 x 16 latent grid, as area weights) and over the rest, and per class: it shows where the caption's
information goes.

Usage::

    python tools/toy_caption_gap.py --scenes 128 --seed 1 --out docs/results/toy-caption-gap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from opendaam.models import load_pipeline, set_threads
from opendaam.toyworld.scene import CLASSES, class_mask, render_scene
from opendaam.toyworld.train import HELD_OUT, _caption_predictions, render_dataset


@torch.no_grad()
def region_gaps(pipe, scenes: int, seed: int, t: int = 500) -> dict:
    """Right / wrong / empty caption losses and gaps over all, object and background latent pixels."""
    unet, text, tokenizer, vae = pipe.unet.float(), pipe.text_encoder.float(), pipe.tokenizer, pipe.vae.float()
    classes = [CLASSES[i % len(CLASSES)] for i in range(scenes)]
    images, _, _ = render_dataset([HELD_OUT + i for i in range(scenes)], classes)  # (N, 3, 64, 64)
    factor = images.shape[-1] // unet.config.sample_size
    weights = torch.stack([
        F.avg_pool2d(torch.from_numpy(class_mask(render_scene(HELD_OUT + i, cls=c).labels, c).astype(np.float32))
                     [None, None], factor)[0, 0] for i, c in enumerate(classes)])  # (N, h, w) object fraction
    latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor  # (N, 4, h, w)
    noise, preds = _caption_predictions(unet, text, tokenizer, latents, classes, pipe.scheduler, t, seed)
    errors = {name: ((pred - noise) ** 2).mean(1) for name, pred in preds.items()}  # (N, h, w) each
    result = {"scenes": scenes, "noise_seed": seed, "t": t, "object_area": float(weights.mean())}
    for region, w in (("all", torch.ones_like(weights)), ("object", weights), ("background", 1 - weights)):
        loss = {k: float((e * w).sum() / w.sum()) for k, e in errors.items()}
        result[region] = {**loss, "wrong_gap": loss["wrong"] / loss["right"] - 1,
                          "empty_gap": loss["empty"] / loss["right"] - 1}
    extra = errors["empty"] - errors["right"]
    result["empty_extra_on_object"] = float((extra * weights).sum() / extra.sum())
    for c in CLASSES:
        idx = [i for i, k in enumerate(classes) if k == c]
        loss = {k: float(e[idx].mean()) for k, e in errors.items()}
        result[c] = {"wrong_gap": loss["wrong"] / loss["right"] - 1, "empty_gap": loss["empty"] / loss["right"] - 1,
                     "object_area": float(weights[idx].mean())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="toy-urban")
    parser.add_argument("--scenes", type=int, default=128)
    parser.add_argument("--seed", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    set_threads(args.threads)
    pipe = load_pipeline(args.model)
    results = [region_gaps(pipe, args.scenes, seed) for seed in args.seed]
    for r in results:
        print(f"{r['scenes']} scenes, noise seed {r['noise_seed']}, object area {r['object_area']:.3f}")
        for region in ("all", "object", "background"):
            print(f"  {region:10s} wrong {r[region]['wrong_gap']:+.1%}  empty {r[region]['empty_gap']:+.1%}")
        print(f"  share of the empty caption's extra loss on object pixels: {r['empty_extra_on_object']:.0%}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
