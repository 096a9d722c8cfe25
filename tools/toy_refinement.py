"""Self-attention refinement and adaptive thresholds on toy-urban, measured against exact masks.

Generates img2img scenes per class (strength 0.5 from rendered scenes, so the rendered labels hold: the thesis
experiment's ground truth), traces DAAM and the self-attention affinities of each U-Net resolution, and prints
(1) the max mIoU over thresholds of DAAM and of DAAM refined (``opendaam.refine``) with each layer group and
power, per class and on average, and (2) the dataset labels of DAAM and of the best refinement with the fixed band
(0.3 / 0.5, the dataset default) and with adaptive thresholds: the class IoU, the precision of the labelled
pixels and the share of pixels ignored, per class and on average. With ``--tokens DIR`` (the class tokens
of an ``opendaam experiment segmenter`` run, ``DIR/<class>.safetensors``) it also labels with the tokens'
linear maps, refined and thresholded adaptively: the segmenter experiment's three labellers side by side.
The default seeds (34,000,000+) are held out from the model's training scenes and from the segmenter run's.

Usage::

    python tools/toy_refinement.py --per-class 20 --tokens runs/seg/tokens --out docs/results/toy-refinement.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from opendaam.dataset.labels import IGNORE, adaptive_label_map, label_map
from opendaam.experiments import TEMPLATE, THESIS_CLASSES, ToyWorldAnnotator
from opendaam.heatmaps import heatmaps
from opendaam.metrics import curve_summary, default_thresholds, threshold_curve
from opendaam.models import generation_defaults, load_pipeline, set_threads
from opendaam.refine import refine
from opendaam.tracing import trace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=20, help="scenes per class")
    parser.add_argument("--seed0", type=int, default=34_000_000, help="first scene seed")
    parser.add_argument("--tokens", type=Path, default=None, help="folder of class tokens <class>.safetensors")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    set_threads(args.threads)
    pipe = load_pipeline("toy-urban", img2img=True)
    pipe.set_progress_bar_config(disable=True)
    call = generation_defaults(pipe)
    call.pop("height"), call.pop("width")
    annotator = ToyWorldAnnotator()
    taus = default_thresholds(0.05)
    groups = {"16x16": ("down_blocks.0", "up_blocks.2"), "8x8": ("down_blocks.1", "up_blocks.1")}
    variants = ["daam"] + [f"refined {g} p{p}" for g in groups for p in (1, 2, 4)]
    curves = {v: {c: [] for c in THESIS_CLASSES} for v in variants}
    labelled = {f"{m} {t}": {c: [] for c in THESIS_CLASSES} for m in ("daam", "refined 8x8 p1")
                for t in ("fixed", "adaptive")}
    tokens = {}
    if args.tokens is not None:
        from opendaam.optimize import load_token

        tokens = {c: load_token(args.tokens / f"{c.replace(' ', '_')}.safetensors", pipe=pipe) for c in THESIS_CLASSES}
        labelled["tokens refined 8x8 p1 adaptive"] = {c: [] for c in THESIS_CLASSES}
    start = time.perf_counter()
    for cls in THESIS_CLASSES:
        for seed in range(args.seed0, args.seed0 + args.per_class):
            prompt = TEMPLATE.format(cls)
            with trace(pipe, self_attention=sum(groups.values(), ()), linear=bool(tokens)) as tracer:
                pipe(prompt, image=annotator.init_image(cls, seed), strength=annotator.strength,
                     generator=torch.Generator().manual_seed(seed), **call)
            record = tracer.records[0]
            mask = torch.from_numpy(annotator.mask(cls, seed, record.image_size))
            maps = heatmaps(record, cls)
            found = {"daam": maps}
            for group, prefixes in groups.items():
                for power in (1, 2, 4):
                    found[f"refined {group} p{power}"] = refine(record, maps, power=power, layers=prefixes)
            for name, m in found.items():
                curves[name][cls].append(threshold_curve(m.soft, mask[None], taus))
            truth = mask.numpy()
            rules = {"daam": ("fixed", "adaptive"), "refined 8x8 p1": ("fixed", "adaptive")}
            if tokens:
                linear = heatmaps(record, tokens[cls], "linear")
                found["tokens refined 8x8 p1"] = refine(record, linear, power=1, layers=groups["8x8"])
                rules["tokens refined 8x8 p1"] = ("adaptive",)
            for name, chosen in rules.items():
                scores = found[name].normalized()[0].clamp(0, 1).numpy()[None]  # (1, H, W) as a dataset scores
                for rule in chosen:
                    labels = label_map(scores, [1], 0.3, 0.5) if rule == "fixed" else adaptive_label_map(scores, [1])
                    known = labels != IGNORE
                    said = labels == 1
                    labelled[f"{name} {rule}"][cls].append((
                        (said & truth).sum() / max((said | truth).sum(), 1),  # class IoU (ignored counts as miss)
                        ((labels == 1) == truth)[known].mean() if known.any() else float("nan"),  # precision
                        1 - known.mean()))  # share ignored
    result = {"per_class": args.per_class, "seed0": args.seed0, "strength": annotator.strength,
              "seconds": round(time.perf_counter() - start, 1), "max_miou": {}}
    for name in variants:
        scores = {c: 100 * curve_summary(torch.cat(curves[name][c], dim=1), taus)["max_miou"] for c in THESIS_CLASSES}
        scores["mean"] = sum(scores.values()) / len(THESIS_CLASSES)
        result["max_miou"][name] = {k: round(v, 1) for k, v in scores.items()}
        print(f"{name:18s} " + "  ".join(f"{k} {v:5.1f}" for k, v in scores.items()))
    result["labels"] = {}
    for name, per_class in labelled.items():
        rows = [row for c in THESIS_CLASSES for row in per_class[c]]
        iou, precision, ignored = (float(np.nanmean(col)) for col in zip(*rows, strict=True))
        by_class = {c: round(100 * float(np.nanmean([r[0] for r in per_class[c]])), 1) for c in THESIS_CLASSES}
        result["labels"][name] = {"iou": round(100 * iou, 1), "precision": round(100 * precision, 1),
                                  "ignored": round(100 * ignored, 1), "iou_per_class": by_class}
        print(f"labels {name:32s} IoU {100 * iou:5.1f}  precision {100 * precision:5.1f}  "
              f"ignored {100 * ignored:5.1f}%  " + "  ".join(f"{c} {v:5.1f}" for c, v in by_class.items()))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
