"""Localization gate of the toy-urban model (issue: DAAM vs the class prior, centred box, control word).

Reads the data folder of an ``opendaam experiment thesis`` run (records, masks, items.json) and prints, per
class, the max mIoU over thresholds on the test images (all but the first 5 per class) of: DAAM, DAAM of one
resolution level of the U-Net (its layers at that feature-map size only), the class prior as the issue
defines it (the mean of *all* ground-truth masks of the class), a centred box of the prior's area, and DAAM of
the control word "environment".

Usage::

    opendaam experiment thesis --model toy-urban --per-class 50 --train 1 2 5 --threads 1 --out runs/thesis
    python tools/toy_localization.py runs/thesis/data --out docs/results/thesis-toy-urban/localization.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from opendaam.cache import load_record
from opendaam.experiments import CONTROL_WORD, center_box, load_items, read_mask
from opendaam.heatmaps import heatmaps
from opendaam.metrics import curve_summary, default_thresholds, threshold_curve
from opendaam.models import set_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path, help="the data/ folder of a thesis run")
    parser.add_argument("--train", type=int, default=5, help="leading images per class left out (training pool)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    set_threads(1)
    taus = default_thresholds(0.05)
    items = load_items(args.data)
    result = {}
    for cls in dict.fromkeys(i.cls for i in items):
        chosen = [i for i in items if i.cls == cls]
        records = [load_record(args.data / i.record) for i in chosen]
        masks = torch.stack([read_mask(args.data / i.mask, r.image_size) for i, r in zip(chosen, records, strict=True)])
        test = slice(args.train, None)
        prior = masks.float().mean(0)  # (H, W): every ground-truth mask of the class
        maps = {
            "daam": torch.stack([heatmaps(r, cls).soft[0] for r in records]),
            "class_prior": prior.expand(len(records), *prior.shape),
            "center_box": center_box(prior).expand(len(records), *prior.shape),
            "control_word": torch.stack([heatmaps(r, CONTROL_WORD).soft[0] for r in records]),
        }
        first = records[0]
        for size in sorted({info.height for info in first.layers.values()}):
            names = [n for n, info in first.layers.items() if info.height == size]
            maps[f"daam_level_{size}"] = torch.stack([heatmaps(r, cls, layers=names).soft[0] for r in records])
        result[cls] = {k: round(100 * curve_summary(threshold_curve(v[test], masks[test], taus), taus)["max_miou"], 1)
                       for k, v in maps.items()}
        result[cls]["test_images"] = len(records) - args.train
        print(cls, result[cls])
    keys = [k for k in next(iter(result.values())) if k != "test_images"]
    result["mean"] = {k: round(sum(r[k] for r in result.values()) / len(result), 1) for k in keys}
    print("mean", result["mean"])
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
