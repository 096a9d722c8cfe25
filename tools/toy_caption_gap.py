"""Caption gap of the toy-urban weights at t = 500, split into object and background latent pixels.

The issue's gate compares the denoising MSE of the right caption with a wrong-class and an empty caption
over whole latents (``opendaam.toyworld.train.caption_gap``, which this reproduces exactly). Here the same
squared errors are also averaged over the pixels of the main object (its ground-truth mask pooled to the
16 x 16 latent grid, as area weights) and over the rest, and per class: it shows where the caption's
information goes. It also splits them by the Cityscapes label of the latent pixels (which parts of the scene
the caption informs, and which carry the loss), repeats the whole-image and object gaps at other
timesteps, and reports the diffusion-classifier accuracy (the class caption with the lowest loss).

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
from opendaam.toyworld.scene import CLASSES, LABEL_IDS, LOOKALIKE_CLASSES, class_mask, render_scene, template_caption
from opendaam.toyworld.train import HELD_OUT, _alphas, _caption_predictions, _noised, _predict, render_dataset

TIMESTEPS = (100, 300, 500, 700, 900)


def _gaps(errors: dict[str, torch.Tensor], w: torch.Tensor) -> dict:
    """Area-weighted right / wrong / empty losses over ``w`` and the two relative gaps."""
    loss = {k: float((e * w).sum() / w.sum()) for k, e in errors.items()}
    return {**loss, "wrong_gap": loss["wrong"] / loss["right"] - 1, "empty_gap": loss["empty"] / loss["right"] - 1}


@torch.no_grad()
def classifier(unet, text, tokenizer, latents: torch.Tensor, classes: list[str], scheduler, t: int,
               seed: int) -> dict:
    """Diffusion-classifier accuracy: the caption (of the thesis classes, or of all seven) with the lowest loss."""
    names = list(CLASSES + LOOKALIKE_CLASSES)
    noise, noisy, steps = _noised(latents, scheduler, t, seed)  # the draw _caption_predictions makes
    losses = torch.stack([((_predict(unet, text, tokenizer, noisy, steps, [template_caption(c)] * len(classes))
                            - noise) ** 2).mean((1, 2, 3)) for c in names], 1)  # (N, 7)
    truth = torch.tensor([names.index(c) for c in classes])
    picked = losses.argmin(1)
    return {"accuracy_thesis_captions": float((losses[:, :len(CLASSES)].argmin(1) == truth).float().mean()),
            "accuracy_all_captions": float((picked == truth).float().mean()),
            "picked": {c: {n: int((picked[truth == k] == j).sum()) for j, n in enumerate(names)}
                       for k, c in enumerate(CLASSES)}}


@torch.no_grad()
def region_gaps(pipe, scenes: int, seed: int, t: int = 500, timesteps: tuple[int, ...] = TIMESTEPS) -> dict:
    """Right / wrong / empty caption losses and gaps over all, object and background latent pixels."""
    unet, text, tokenizer, vae = pipe.unet.float(), pipe.text_encoder.float(), pipe.tokenizer, pipe.vae.float()
    classes = [CLASSES[i % len(CLASSES)] for i in range(scenes)]
    images, _, _ = render_dataset([HELD_OUT + i for i in range(scenes)], classes)  # (N, 3, 64, 64)
    factor = images.shape[-1] // unet.config.sample_size
    labels = torch.from_numpy(np.stack([render_scene(HELD_OUT + i, cls=c).labels
                                        for i, c in enumerate(classes)]).astype(np.int64))  # (N, 64, 64)
    weights = torch.stack([
        F.avg_pool2d(torch.from_numpy(class_mask(labels[i].numpy(), c).astype(np.float32))[None, None], factor)[0, 0]
        for i, c in enumerate(classes)])  # (N, h, w) object fraction
    latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor  # (N, 4, h, w)
    noise, preds = _caption_predictions(unet, text, tokenizer, latents, classes, pipe.scheduler, t, seed)
    errors = {name: ((pred - noise) ** 2).mean(1) for name, pred in preds.items()}  # (N, h, w) each
    result = {"scenes": scenes, "noise_seed": seed, "t": t, "object_area": float(weights.mean())}
    for region, w in (("all", torch.ones_like(weights)), ("object", weights), ("background", 1 - weights)):
        result[region] = _gaps(errors, w)
    extra = errors["empty"] - errors["right"]
    result["empty_extra_on_object"] = float((extra * weights).sum() / extra.sum())
    for c in CLASSES:
        scenes_of_c = torch.tensor([k == c for k in classes])[:, None, None].expand_as(weights).float()  # (N, h, w)
        gaps = _gaps(errors, scenes_of_c)
        result[c] = {"wrong_gap": gaps["wrong_gap"], "empty_gap": gaps["empty_gap"],
                     "object_area": float((weights * scenes_of_c).sum() / scenes_of_c.sum())}
    # Which labels carry the right caption's loss, and where the caption helps.
    total = float(errors["right"].sum())
    result["by_label"] = {}
    for name, label in LABEL_IDS.items():
        w = F.avg_pool2d((labels == label).float()[:, None], factor)[:, 0]  # (N, h, w) label fraction
        if float(w.sum()) > 0:
            share = float((errors["right"] * w).sum()) / total
            result["by_label"][name] = {"pixels": float(w.mean()), "loss_share": share, **_gaps(errors, w)}
    # The same gaps at other timesteps (same noise draw).
    result["by_timestep"] = {}
    for step in timesteps:
        if step == t:
            errors_t = errors
        else:
            noise_t, preds_t = _caption_predictions(unet, text, tokenizer, latents, classes, pipe.scheduler, step,
                                                    seed)
            errors_t = {name: ((pred - noise_t) ** 2).mean(1) for name, pred in preds_t.items()}
        result["by_timestep"][str(step)] = {"alpha_bar": float(_alphas(pipe.scheduler)[step]),
                                            "all": _gaps(errors_t, torch.ones_like(weights)),
                                            "object": _gaps(errors_t, weights)}
    result["classifier"] = classifier(unet, text, tokenizer, latents, classes, pipe.scheduler, t, seed)
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
        for name, g in r["by_label"].items():
            print(f"  {name:14s} pixels {g['pixels']:.3f}  loss share {g['loss_share']:.3f}  "
                  f"empty {g['empty_gap']:+.1%}")
        for step, g in r["by_timestep"].items():
            print(f"  t={step} (alpha_bar {g['alpha_bar']:.3f}): all empty {g['all']['empty_gap']:+.1%} wrong "
                  f"{g['all']['wrong_gap']:+.1%}; object empty {g['object']['empty_gap']:+.1%}")
        c = r["classifier"]
        print(f"  diffusion classifier at t={r['t']}: {c['accuracy_thesis_captions']:.3f} over the thesis captions, "
              f"{c['accuracy_all_captions']:.3f} over all seven")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
