"""Benchmark: cost of tracing during generation, record sizes, and the speed of new words' maps.

Runs on the exact Stable Diffusion 2-base architecture with random weights (timing does not depend on
the weights). In one process, alternates untraced and traced generations (same seed) round by round and
reports medians and ratios against the untraced median of the same run, checks the images are identical,
and times one new word's map via ``M x``, via the query cache, and an 8-token open-vocabulary map.

With ``--device cuda`` the generations run on the accelerator; records stay on the CPU (``TraceConfig.device``),
so the pipeline is moved back to the CPU before the new-word maps are timed.

Usage::

    python bench/bench_tracing.py --threads 1 --size 256 --steps 30 --rounds 3 --out bench/results/tracing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import numpy as np
import torch
from _common import add_run, sync  # bench/ is on sys.path when run as a script
from _malloc import use_tuned_malloc

from opendaam.cache import query_cache_bytes
from opendaam.heatmaps import heatmaps
from opendaam.models import build_pipeline, set_threads
from opendaam.tracing import trace

MODES = {
    "untraced": None,
    "daam": dict(daam=True, linear=False),
    "daam+linear": dict(daam=True, linear=True),
    "daam+linear+queries": dict(daam=True, linear=True, queries=True),
}
PROMPT = "A car in an urban environment"


def _generate(pipe, args, options):
    """One timed generation; returns (seconds, image array, record or None)."""
    gen = torch.Generator(device=args.device).manual_seed(0)
    call = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=7.5,
                generator=gen, output_type="np")
    sync(args.device)
    start = time.perf_counter()
    if options is None:
        image = pipe(PROMPT, **call).images
        record = None
    else:
        with trace(pipe, prompt=PROMPT, **options) as tracer:
            image = pipe(PROMPT, **call).images
        record = tracer.records[0]
    sync(args.device)
    return time.perf_counter() - start, image, record


def _median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def main() -> None:
    malloc = use_tuned_malloc()  # before anything is allocated: see bench/_malloc.py
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--architecture", default="sd2-base")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="bench/results/tracing.json")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    set_threads(args.threads)

    pipe = build_pipeline(args.architecture, seed=0).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    _generate(pipe, argparse.Namespace(**{**vars(args), "steps": 1}), MODES["daam+linear+queries"])  # warm-up

    times = {name: [] for name in MODES}
    images = {}
    records = {}
    for r in range(args.rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for name in order:
            seconds, image, record = _generate(pipe, args, MODES[name])
            times[name].append(seconds)
            images[name] = image
            if record is not None:
                records[name] = record
            print(f"round {r} {name}: {seconds:.1f} s", flush=True)

    base = statistics.median(times["untraced"])
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "architecture": args.architecture, "size": args.size, "steps": args.steps, "rounds": args.rounds,
        "threads": args.threads, "device": args.device, "dtype": "float32", "malloc": malloc or "glibc defaults",
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "ratio": {k: statistics.median(v) / base for k, v in times.items()},
        "ratio_of_minima": {k: min(v) / min(times["untraced"]) for k, v in times.items()},
        "all_seconds": times,
        "identical_images": {k: bool(np.array_equal(images[k], images["untraced"])) for k in MODES},
    }

    full = records["daam+linear+queries"]
    sizes = full.nbytes()
    calls = full.meta["calls"]
    cfg = pipe.unet.config
    result["record_bytes"] = sizes
    result["query_cache_bytes_512_fp16"] = query_cache_bytes(cfg, 512, 512, calls=calls, bytes_per_value=2,
                                                             vae_scale_factor=pipe.vae_scale_factor)
    result["query_cache_bytes_512_int8"] = query_cache_bytes(
        cfg, 512, 512, calls=calls, bytes_per_value=1 + 2 / 64, vae_scale_factor=pipe.vae_scale_factor)
    result["query_cache_bytes_512_fp32_ovam"] = query_cache_bytes(
        cfg, 512, 512, calls=calls, bytes_per_value=4, vae_scale_factor=pipe.vae_scale_factor)
    result["linear_map_bytes_512"] = (512 // pipe.vae_scale_factor) ** 2 * cfg.cross_attention_dim * 4

    # int8 storage: one more traced run, maps compared with the fp16 cache's
    _, _, int8_record = _generate(pipe, args, dict(queries=True, query_dtype="int8"))
    pipe.to("cpu")  # records live on the CPU: new words' maps are computed there
    words = ["car", "urban", "environment", "tree", "building", "road", "sky", "sidewalk"]
    fp16_maps = heatmaps(full, words, "open_vocab", pipe=pipe).latent
    int8_maps = heatmaps(int8_record, words, "open_vocab", pipe=pipe).latent
    corr = [float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])
            for a, b in zip(fp16_maps, int8_maps, strict=True)]
    result["int8_min_correlation"] = min(corr)
    result["int8_query_bytes"] = int8_record.nbytes()["queries"] + int8_record.nbytes().get("query_scales", 0)

    # a new word's map: linear via M x, linear from the query cache, 8-token open vocabulary
    dim = cfg.cross_attention_dim
    x = torch.randn(dim)
    all_steps = full.steps
    x8 = torch.randn(8, dim)
    with torch.no_grad():
        result["ms_linear_Mx"] = _median_ms(lambda: heatmaps(full, x, "linear").latent, 200)
        result["ms_linear_from_cache"] = _median_ms(
            lambda: heatmaps(full, x, "linear", pipe=pipe, steps=all_steps).latent, 5)
        result["ms_open_vocab_8_tokens"] = _median_ms(
            lambda: heatmaps(full, x8, "open_vocab", pipe=pipe).latent, 5)
        result["ms_open_vocab_8_tokens_text"] = _median_ms(
            lambda: heatmaps(full, ["car"], "open_vocab", pipe=pipe, context="a car in an urban environment",
                             softmax_over="prompt").latent, 5)

    add_run(args.out, f"tracing_{result['date'][:16]}", result)  # one file per benchmark: runs kept by name
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
