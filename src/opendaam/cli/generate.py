"""``opendaam generate``: generate an image and write its word maps, masks, overlays and a summary."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from opendaam.cli._checks import (
    MAX_SEED,
    check_model,
    check_output_dir,
    check_prompt,
    check_size,
    check_token_file,
    in_range,
)
from opendaam.models import SCHEDULERS

__all__ = ["add_parser", "run", "safe_name", "validate"]


def add_parser(sub) -> None:
    """Register the ``generate`` subcommand."""
    p = sub.add_parser("generate", help="generate an image and its word-to-pixel maps",
                       description=__doc__)
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("--model", default="toy-urban", help="hub id, local folder, or bundled name (toy-urban)")
    p.add_argument("--seed", type=int, default=0,
                   help=f"generator seed, 0 .. {MAX_SEED} (2**63 - 1); the same seed gives the same image")
    p.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's own)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale, >= 0; 1 or less turns guidance off (default: the model's own)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=int, default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--scheduler", default=None, help=f"{', '.join(SCHEDULERS)} (default: the model's)")
    p.add_argument("--words", nargs="*", default=None,
                   help="words to map (default: the prompt's words); with daam they must be in the prompt")
    p.add_argument("--method", default="daam", help="daam, open_vocab or linear")
    p.add_argument("--token", nargs="*", default=[],
                   help="optimized token files to map as well (open_vocab or linear)")
    p.add_argument("--tau", type=float, default=0.4,
                   help="mask threshold in [0, 1], relative to each map's maximum")
    p.add_argument("--threads", type=int, default=None, help="torch threads, >= 1 (default: torch's choice)")
    p.add_argument("--no-record", action="store_true", help="do not save record.safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(run=run)


def safe_name(word: str) -> str:
    """A file-name-safe form of a word.

    Examples:
        >>> safe_name("traffic light"), safe_name("<eot>")
        ('traffic_light', 'eot')
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", word.strip()).strip("_") or "word"


def validate(args) -> None:
    """Every check that needs no model weights: options, token files, model folder, prompt, words, --out.

    Raises:
        ValueError, FileNotFoundError: one line naming the problem and the option to change.
    """
    from opendaam.heatmaps import METHODS

    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is unknown; choose one of: {', '.join(METHODS)}")
    in_range("--seed", args.seed, 0, MAX_SEED, integer=True)
    in_range("--steps", args.steps, 1, integer=True)
    in_range("--threads", args.threads, 1, integer=True)
    in_range("--guidance", args.guidance, 0)
    in_range("--tau", args.tau, 0, 1)
    if args.scheduler is not None and args.scheduler.lower() not in SCHEDULERS:
        raise ValueError(f"--scheduler {args.scheduler!r} is unknown; choose one of: {', '.join(SCHEDULERS)}")
    if args.words is not None and not args.words:
        raise ValueError("--words needs at least one word (leave it out to map every word of the prompt)")
    if args.words is not None and not all(w.strip() for w in args.words):
        raise ValueError("--words: a word is empty")
    if args.token and args.method == "daam":
        raise ValueError("optimized tokens are not in the prompt, so daam cannot map them: use --method linear or "
                         "--method open_vocab")
    for path in args.token:
        check_token_file(path)
    check_output_dir(args.out)
    info = check_model(args.model)
    if info is not None and args.method == "linear" and info.family.startswith("joint attention"):
        raise ValueError(f"--method linear needs keys linear in the text; {args.model} uses {info.family}, whose "
                         "later blocks' text depends on the image: use --method daam or open_vocab")
    check_size(info, args.height, args.width)
    check_prompt(info, [args.prompt], args.words if args.method == "daam" else None)


def _maps(record, words: list[str], optimized: list, method: str, pipe):
    """Maps of the words and the optimized tokens; for open_vocab computed apart (it cannot mix words,
    which need a context prompt, with embeddings in one call) and joined."""
    from opendaam.heatmaps import Heatmaps, heatmaps

    if method != "open_vocab" or not words or not optimized:
        return heatmaps(record, [*words, *optimized], method, pipe=pipe)
    a, b = heatmaps(record, words, method, pipe=pipe), heatmaps(record, optimized, method, pipe=pipe)
    return Heatmaps(torch.cat([a.latent, b.latent]), [*a.labels, *b.labels], [*a.token_indices, *b.token_indices],
                    method=a.method, image_size=a.image_size, mode=a.mode)


def run(args) -> int:
    """Generate, trace and write the outputs of ``opendaam generate``."""
    validate(args)
    import diffusers
    import transformers
    from PIL import Image

    import opendaam
    from opendaam.heatmaps import find_tokens, prompt_words
    from opendaam.models import generation_defaults, load_pipeline, set_threads
    from opendaam.optimize import load_token
    from opendaam.tracing import adapter_for, trace
    from opendaam.tracing.tracer import prompt_segments
    from opendaam.viz import overlay_grid, to_pil

    set_threads(args.threads)
    timings = {}
    start = time.perf_counter()
    pipe = load_pipeline(args.model, scheduler=args.scheduler)
    pipe.set_progress_bar_config(disable=getattr(args, "verbosity", 0) < 1)
    timings["load_s"] = time.perf_counter() - start
    call = generation_defaults(pipe, num_inference_steps=args.steps, guidance_scale=args.guidance,
                               height=args.height, width=args.width)
    tokens = prompt_segments(pipe, args.prompt)[0]["tokens"]  # hub models: their prompt length is known only now
    words = args.words if args.words is not None else [w for w, _ in prompt_words(tokens)]
    if args.method == "daam" and args.words:
        for word in words:  # a hub model's tokenizer was not readable before loading
            find_tokens(tokens, word)
    optimized = [load_token(path, pipe=pipe) for path in args.token]
    out = Path(args.out)
    for sub in ("maps", "masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    # open-vocabulary maps need the query cache (cross-attention) or the replay data (joint attention)
    joint = not adapter_for(pipe).linear_keys
    need = {"replay" if joint else "queries": args.method == "open_vocab"}
    start = time.perf_counter()
    with trace(pipe, prompt=args.prompt, meta={"seed": args.seed}, **need) as tracer:
        result = pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), output_type="np",
                      **call)
    timings["generate_s"] = time.perf_counter() - start
    record = tracer.records[0]
    image = to_pil(result.images[0])
    image.save(out / "image.png")

    start = time.perf_counter()
    maps = _maps(record, words, optimized, args.method, pipe)
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
