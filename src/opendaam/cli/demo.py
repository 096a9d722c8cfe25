"""``opendaam demo``: the bundled toy-urban model, its images and DAAM, open-vocabulary and linear maps."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from opendaam._io import atomic_write_with

__all__ = ["CLASSES", "EXTRA_WORDS", "add_parser", "run"]

CLASSES = ("car", "person", "traffic light", "rider")
"""The thesis' classes; one prompt "a <class> in an urban environment" each."""

EXTRA_WORDS = ("tree", "building", "road", "sky", "sidewalk")
"""Words that are not in the prompts: only open-vocabulary and linear maps can show them."""


def add_parser(sub) -> None:
    """Register the ``demo`` subcommand."""
    p = sub.add_parser("demo", help="maps for a few images of the bundled toy-urban model", description=__doc__)
    p.add_argument("--model", default="toy-urban", help="hub id, local folder, or bundled name")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="noise seed of the first image; image i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's choice; set it when other jobs share the CPU)")
    p.set_defaults(run=run)


def run(args) -> int:
    """Generate one image per class and write overlay grids and a summary."""
    from opendaam.heatmaps import heatmaps
    from opendaam.models import generation_defaults, load_pipeline, set_threads
    from opendaam.report import write_html
    from opendaam.tracing import trace
    from opendaam.viz import overlay_grid, to_pil

    set_threads(args.threads)
    started = time.perf_counter()
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=getattr(args, "verbosity", 0) < 1)  # -v shows the denoising bars
    call = generation_defaults(pipe)
    if args.steps:
        call["num_inference_steps"] = args.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"model": args.model, **call, "seed": args.seed, "images": []}
    for i, cls in enumerate(CLASSES):
        prompt = f"a {cls} in an urban environment"
        with trace(pipe, prompt=prompt, queries=True) as tracer:
            result = pipe(prompt, generator=torch.Generator().manual_seed(args.seed + i), output_type="np",
                          **call)
        record = tracer.records[0]
        image = to_pil(result.images[0])
        words = [cls, *EXTRA_WORDS]
        rows = [
            ("daam", heatmaps(record, [cls, "urban", "environment"])),
            ("open_vocab", heatmaps(record, words, "open_vocab", pipe=pipe)),
            ("linear", heatmaps(record, words, "linear", pipe=pipe)),
        ]
        name = cls.replace(" ", "_")
        image.save(out / f"{name}.png")
        overlay_grid(image, rows).save(out / f"{name}_maps.png")
        arrays = {method: maps.latent.detach().float().numpy() for method, maps in rows}  # for the HTML report
        atomic_write_with(out / f"{name}_maps.npz", lambda tmp, a=arrays: np.savez_compressed(tmp, **a))
        entry = {"prompt": prompt, "image": f"{name}.png", "grid": f"{name}_maps.png",
                 "arrays": f"{name}_maps.npz", "image_size": list(record.image_size), "maps": {}}
        for method, maps in rows:
            masks = maps.masks(0.4)
            entry["maps"][method] = {
                label: {"mask_fraction_at_0.4": round(float(masks[j].float().mean()), 4)}
                for j, label in enumerate(maps.labels)
            }
        summary["images"].append(entry)
        print(f"{prompt!r}: wrote {name}.png and {name}_maps.png", flush=True)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    atomic_write_with(out / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    write_html(out, title=f"opendaam demo: {args.model}")
    print(f"demo finished in {summary['seconds']} s; open {out}/index.html (or {out}/*_maps.png)")
    return 0
