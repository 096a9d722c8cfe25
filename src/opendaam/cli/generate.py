"""``opendaam generate``: generate an image and write its word maps, masks, overlays and a summary."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

__all__ = ["add_parser", "run", "safe_name"]


def add_parser(sub) -> None:
    """Register the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate an image and its word-to-pixel maps",
                       description=__doc__)
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default="toy-urban", help="hub id, local folder, or bundled name (toy-urban)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's own)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--scheduler", default=None, help="pndm, ddim, euler, dpm++, ... (default: the model's)")
    p.add_argument("--words", nargs="*", default=None, help="words to map (default: the prompt's words)")
    p.add_argument("--method", default="daam", help="daam, open_vocab or linear")
    p.add_argument("--token", nargs="*", default=[], help="optimized token files to map as well")
    p.add_argument("--tau", type=float, default=0.4, help="mask threshold relative to each map's maximum")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not save record.safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=run)


def safe_name(word: str) -> str:
    """A file-name-safe form of a word.

    Example:
        >>> safe_name("traffic light"), safe_name("<eot>")
        ('traffic_light', 'eot')
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", word.strip()).strip("_") or "word"


def run(args) -> int:
    """Generate, trace and write the outputs of ``opendaam generate``."""
    import diffusers
    import transformers
    from PIL import Image

    import opendaam
    from opendaam.heatmaps import heatmaps, prompt_words
    from opendaam.models import generation_defaults, load_pipeline, set_threads
    from opendaam.optimize import load_token
    from opendaam.tracing import tokenize_prompt, trace
    from opendaam.viz import overlay_grid, to_pil

    set_threads(args.threads)
    timings = {}
    start = time.perf_counter()
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    timings["load_s"] = time.perf_counter() - start
    call = generation_defaults(pipe, num_inference_steps=args.steps, guidance_scale=args.guidance,
                               height=args.height, width=args.width)
    _, tokens = tokenize_prompt(pipe, args.prompt)  # fails early on prompts over 77 tokens
    words = args.words if args.words is not None else [w for w, _ in prompt_words(tokens)]
    optimized = [load_token(path, pipe=pipe) for path in args.token]
    if optimized and args.method == "daam":
        raise ValueError("optimized tokens are not in the prompt: use --method linear or --method open_vocab")
    out = Path(args.out)
    for sub in ("maps", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    queries = args.method == "open_vocab"  # the query cache is only needed for open-vocabulary maps
    start = time.perf_counter()
    with trace(pipe, prompt=args.prompt, queries=queries, meta={"seed": args.seed}) as tracer:
        result = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), output_type="np",
                      **call)
    timings["generate_s"] = time.perf_counter() - start
    record = tracer.records[0]
    image = to_pil(result.images[0])
    image.save(out / "image.png")

    start = time.perf_counter()
    maps = heatmaps(record, [*words, *optimized], args.method, pipe=pipe)
    soft = maps.soft.detach()
    masks = maps.masks(args.tau)
    timings["heatmaps_s"] = time.perf_counter() - start

    entries, used = [], set()
    for i, word in enumerate(maps.labels):
        token_file = args.token[i - len(words)] if i >= len(words) else None
        name = safe_name(word) + ("_token" if token_file else "")  # a token for "car" beside the word "car"
        name = next(n for n in [name, *(f"{name}_{k}" for k in range(2, len(maps.labels) + 2))] if n not in used)
        used.add(name)
        np.save(out / "maps" / f"{name}.npy", soft[i].numpy().astype(np.float32))
        Image.fromarray(masks[i].numpy().astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
        maps.overlay(image, i).save(out / "overlays" / f"{name}.png")
        entries.append({
            "word": word, "file": name, "token_file": token_file, "token_indices": maps.token_indices[i],
            "min": float(soft[i].min()), "max": float(soft[i].max()), "mean": float(soft[i].mean()),
            "mask_fraction": float(masks[i].float().mean()),
        })
    overlay_grid(image, [(args.method, maps)]).save(out / "overlay.png")
    if not args.no_record:
        record.save(out / "record.safetensors")
    summary = {
        "prompt": args.prompt, "method": args.method, "tau": args.tau, "seed": args.seed, **call,
        "tokens": tokens, "words": entries, "timings": timings,
        "provenance": {
            "model": record.meta.get("model") or args.model, "revision": record.meta.get("revision"),
            "scheduler": record.meta.get("scheduler"), "unet_calls": record.meta.get("calls"),
            "image_size": record.image_size, "latent_size": record.latent_size,
            "opendaam": opendaam.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out}/image.png, overlay.png and maps, masks, overlays for: {', '.join(maps.labels)}")
    return 0
