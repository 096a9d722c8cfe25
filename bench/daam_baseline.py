"""Baseline: tracing overhead of the original DAAM package (PyPI ``daam`` 0.2.0) on SD 2-base shapes.

Runs only in the separate environment made by ``bench/setup_daam_venv.sh`` (diffusers 0.21.2, which
``daam`` 0.2.0 pins), never in opendaam's own environment, and imports nothing from opendaam.

It builds the exact Stable Diffusion 2-base architecture with random weights from configs (no hub
access: timing does not depend on the weights), with the CLIP tokenizer files that opendaam ships.
In one process it alternates rounds of an untraced generation and a generation traced with DAAM's
public API (``with trace(pipe) as tc``), the traced round including the global heat map and one word's
map, and reports medians, their ratio, whether the images are identical, and peak RSS as JSON.

Usage (the full benchmark; ``--steps 2 --rounds 1`` for a smoke run)::

    /opt/daam-venv/bin/python bench/daam_baseline.py --threads 1 --size 256 --steps 30 --rounds 3 \\
        --out bench/results/daam_baseline.json

``--device cuda`` runs it on an accelerator (the pipeline is moved there; DAAM's ``set_seed`` draws its
generator on CUDA whenever one is available). ``--guidance``, ``--num-images``, ``--height`` and ``--width``
probe DAAM's limits; a traced round that raises is reported in the JSON (``traced_error``) and the script
exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import peak_memory_mb, reset_peak_memory  # noqa: E402  (standard library only: no opendaam)

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "src" / "opendaam" / "assets" / "clip_tokenizer"
PROMPT = "A car in an urban environment"
WORD = "car"
PACKAGES = ("daam", "diffusers", "transformers", "huggingface_hub", "accelerate", "torch", "numpy")


def build_sd2_base(seed: int = 0) -> Any:
    """Assemble a Stable Diffusion 2-base ``StableDiffusionPipeline`` with random fp32 weights.

    Args:
        seed: seeds the random initialisation, so two builds are identical.

    Returns:
        The pipeline, without safety checker, its progress bar disabled.
    """
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            vocab_size=49408,
            hidden_act="gelu",
            projection_dim=512,
        )
    )
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), pad_token="!", model_max_length=77
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe: Any, args: argparse.Namespace, traced: bool, steps: int | None = None) -> dict[str, Any]:
    """Run one generation, untraced or under ``daam.trace``, and time it.

    Args:
        pipe: the pipeline.
        args: parsed command-line arguments (size, guidance, seed, ...).
        traced: trace with DAAM and compute the global heat map and ``WORD``'s map.
        steps: overrides ``args.steps`` (for the warm-up).

    Returns:
        ``seconds`` (the whole round), ``image`` (float array), and for a traced round
        ``generate_seconds``, ``heat_map_seconds`` and a few facts about the maps.
    """
    from daam import trace

    call = dict(
        num_inference_steps=steps or args.steps,
        height=args.height,
        width=args.width,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=_generator(args),
        output_type="np",
    )
    result: dict[str, Any] = {}
    start, cpu_start = time.perf_counter(), time.process_time()
    if not traced:
        image = pipe(PROMPT, **call).images
    else:
        with trace(pipe) as tc:
            image = pipe(PROMPT, **call).images
            generated = time.perf_counter()
            global_map = tc.compute_global_heat_map()
            word_map = global_map.compute_word_heat_map(WORD)
            keys = [key for key, _ in tc.all_heat_maps]
            _sync(args.device)
        result["generate_seconds"] = generated - start
        result["heat_map_seconds"] = time.perf_counter() - generated
        result["maps"] = {
            "global_shape": list(global_map.heat_maps.shape),
            "word_shape": list(word_map.heatmap.shape),
            "word_finite": bool(torch.isfinite(word_map.heatmap).all()),
            "raw_keys": len(keys),
            "factors": sorted({factor for factor, _, _ in keys}),
            "layers": len({layer for _, layer, _ in keys}),
            "heads_per_layer": {
                str(layer): 1 + max(h for _, lay, h in keys if lay == layer)
                for layer in sorted({lay for _, lay, _ in keys})
            },
        }
    result["seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = time.process_time() - cpu_start  # all threads; steadier than wall time under load
    result["image"] = np.asarray(image)
    return result


def _generator(args: argparse.Namespace) -> torch.Generator:
    """DAAM's seeded generator, on ``--device`` (``set_seed`` alone picks CUDA whenever it is available)."""
    from daam import set_seed

    gen = set_seed(args.seed)
    if gen.device.type != torch.device(args.device).type:
        gen = torch.Generator(device=args.device).manual_seed(args.seed)
    return gen


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--height``/``--width`` default to ``--size``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--rounds", type=int, default=3, help="untraced/traced pairs")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--num-images", type=int, default=1, help="num_images_per_prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-warmup", action="store_true", help="skip the 1-step traced warm-up")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    args.height = args.height or args.size
    args.width = args.width or args.size
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print its JSON to stdout, and return the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"daam_baseline: --device {args.device}: torch {torch.__version__} sees no CUDA device")
    pipe = build_sd2_base(args.seed).to(args.device)
    build_seconds = time.perf_counter() - start

    traced_error = None
    if not args.no_warmup:
        try:
            generate(pipe, args, traced=True, steps=1)
        except Exception:  # noqa: BLE001 - reported, not hidden
            traced_error = traceback.format_exc(limit=-3)
    peaks = {"build_and_warmup": peak_memory_mb(args.device), "untraced": 0.0, "traced": 0.0}

    times: dict[str, list[float]] = {"untraced": [], "traced": [], "traced_generate": [], "traced_heat_maps": [],
                                     "cpu_untraced": [], "cpu_traced": []}
    equal: list[bool] = []
    max_diff: list[float] = []
    maps: dict[str, Any] | None = None
    for r in range(args.rounds):
        reset_peak_memory(args.device)
        untraced = generate(pipe, args, traced=False)
        peaks["untraced"] = max(peaks["untraced"], peak_memory_mb(args.device))
        times["untraced"].append(untraced["seconds"])
        times["cpu_untraced"].append(untraced["cpu_seconds"])
        print(f"round {r} untraced: {untraced['seconds']:.2f} s", file=sys.stderr, flush=True)
        if traced_error is not None:
            continue
        reset_peak_memory(args.device)
        try:
            traced = generate(pipe, args, traced=True)
        except Exception:  # noqa: BLE001 - reported, not hidden
            traced_error = traceback.format_exc(limit=-3)
            continue
        peaks["traced"] = max(peaks["traced"], peak_memory_mb(args.device))
        times["traced"].append(traced["seconds"])
        times["cpu_traced"].append(traced["cpu_seconds"])
        times["traced_generate"].append(traced["generate_seconds"])
        times["traced_heat_maps"].append(traced["heat_map_seconds"])
        equal.append(bool(np.array_equal(traced["image"], untraced["image"])))
        max_diff.append(float(np.abs(traced["image"] - untraced["image"]).max()))
        maps = traced["maps"]
        print(f"round {r} daam-traced: {traced['seconds']:.2f} s", file=sys.stderr, flush=True)

    medians = {k: statistics.median(v) if v else None for k, v in times.items()}
    base = medians["untraced"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}",
        "versions": {name: version(name) for name in PACKAGES},
        "architecture": "sd2-base (random weights)",
        "prompt": PROMPT,
        "word": WORD,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "rounds": args.rounds,
        "guidance": args.guidance,
        "num_images": args.num_images,
        "seed": args.seed,
        "threads": args.threads,
        "device": args.device,
        "dtype": "float32",
        "build_seconds": build_seconds,
        "seconds": times,
        "median_seconds": medians,
        "ratio_traced_to_untraced": medians["traced"] / base if medians["traced"] else None,
        "ratio_traced_generate_to_untraced": (
            medians["traced_generate"] / base if medians["traced_generate"] else None
        ),
        "ratio_cpu_traced_to_untraced": (
            medians["cpu_traced"] / medians["cpu_untraced"] if medians["cpu_traced"] else None
        ),
        "identical_images": all(equal) if equal else None,
        "max_abs_image_diff": max(max_diff) if max_diff else None,
        "peak_rss_mb": {**peaks, "process": max(peaks.values())},
        "daam_maps": maps,
        "traced_error": traced_error,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    print(text)
    return 1 if traced_error else 0


if __name__ == "__main__":
    sys.exit(main())
