"""How well img2img from rendered scenes keeps the layout (the strength table of toy-urban's TRAINING.md).

Redraws 32 held-out rendered scenes (8 per class, seeds 1,000,500+) with toy-urban at several strengths (20
PNDM steps, guidance 5, the template caption), labels the redrawn images with the bundled segmentation net,
and prints the agreement with the rendered label maps: IoU of the main object's class per class, mIoU over
the classes the rendered scenes contain (the look-alikes are not among them), pixel accuracy, and the share
of pixels labelled with a class the scenes do not contain.

Usage::

    python tools/toy_img2img_eval.py --out /tmp/img2img_eval.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from opendaam.metrics import confusion, iou_score
from opendaam.models import load_pipeline, set_threads
from opendaam.toyworld.annotate import SEG_LABELS, annotate, load_annotator
from opendaam.toyworld.scene import CLASSES, LABEL_IDS, render_scene, template_caption


def _stats(pred: np.ndarray, truth: np.ndarray, name: str) -> torch.Tensor:
    """Per-image confusion counts ``(n, 4)`` of one label in label maps ``(n, H, W)``."""
    k = LABEL_IDS[name]
    return confusion(torch.from_numpy(pred == k), torch.from_numpy(truth == k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.3, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--scenes", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_threads(1)
    net = load_annotator()
    pipe = load_pipeline("toy-urban", img2img=True)
    pipe.set_progress_bar_config(disable=True)
    seeds = [10**6 + 500 + i for i in range(args.scenes)]
    classes = [CLASSES[i % len(CLASSES)] for i in range(args.scenes)]
    scenes = [render_scene(s, cls=c) for s, c in zip(seeds, classes, strict=True)]
    truth = np.stack([s.labels for s in scenes])  # (n, 64, 64) Cityscapes ids
    result = {}
    for strength in args.strengths:
        images = pipe([template_caption(c) for c in classes], image=[s.pil() for s in scenes], strength=strength,
                      num_inference_steps=20, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images
        pred = annotate(images, net)
        pooled = {n: float(iou_score(_stats(pred, truth, n).sum(0))) for n in SEG_LABELS}  # over all images
        present = [n for n in SEG_LABELS if (truth == LABEL_IDS[n]).any()]  # mIoU over the classes drawn
        per_class = {n: round(pooled[n], 3) for n in present}
        absent = np.isin(pred, [LABEL_IDS[n] for n in SEG_LABELS if n not in present])  # (n, 64, 64)
        chosen = {c: [i for i in range(args.scenes) if classes[i] == c] for c in CLASSES}
        objects = {c: round(float(iou_score(_stats(pred, truth, c)[chosen[c]]).mean()), 3) for c in CLASSES}
        result[str(strength)] = {"mIoU": round(float(np.mean(list(per_class.values()))), 3), "object_iou": objects,
                                 "per_class": per_class, "pixel_acc": round(float((pred == truth).mean()), 3),
                                 "absent_class_pixels": round(float(absent.mean()), 4)}
        print(strength, result[str(strength)], flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
