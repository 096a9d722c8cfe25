"""Benchmark: cost of ``opendaam.trace(pipe)`` on full-size SDXL, SD3.5 and Flux architectures with random weights.

The denoiser and VAE are built from the official configs written in ``bench/configs/<model>.json`` (sources cited
there), with random weights: timing does not depend on the weights, and no hub access is needed. Full text encoders
are not built (T5-XXL alone is 4.7 B parameters): the pipeline gets random ``prompt_embeds``, pooled and negative
embeddings of the model's shapes, so the whole denoising loop runs through the real pipeline class.
``--model tiny:<family>`` runs the same code on :func:`opendaam._tiny.build_tiny_pipeline` (a smoke test).

In one process it alternates rounds of an untraced and a traced generation (the default ``opendaam.trace(pipe)``,
order swapped every round), same seed, and reports medians, the traced/untraced ratio, whether the outputs are
bit-identical, peak RSS, the CPU, thread count and load average. With ``--profile`` (or when the ratio exceeds
``--target``) one more traced generation runs under cProfile and torch.profiler, and the opendaam functions and
torch ops that take the time are listed.

Usage::

    python bench/bench_families.py --model sdxl-base --size 512 --steps 4 --rounds 3 --threads 2
    python bench/bench_families.py --model sd3.5-medium --size 512 --steps 4 --rounds 3 --threads 2
    python bench/bench_families.py --model tiny:sd3.5 --size 64 --steps 2 --rounds 2      # smoke test
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run, cpu_model, peak_memory_mb, reset_peak_memory, sync, write_json  # noqa: E402

import opendaam  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"


def load_config(model: str) -> dict[str, Any]:
    """The JSON config of a full-size ``model`` (a file name in ``bench/configs`` without ``.json``)."""
    path = CONFIGS / f"{model}.json"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.json"))
        raise SystemExit(f"bench_families: no config {path}; choose one of {', '.join(known)} or tiny:<family>")
    return json.loads(path.read_text())


def truncate(config: dict[str, Any], blocks: int) -> dict[str, Any]:
    """``config`` with only the first ``blocks`` transformer blocks, every width unchanged.

    MM-DiT blocks are identical in shape, so each costs the same with and without tracing, and the traced /
    untraced ratio of N blocks estimates the full model's (the per-step work outside the blocks, embedding and
    final layer, is a slightly larger share, which makes the estimate conservative). SD3.5's dual-attention
    blocks keep their share (13 of 24 in medium: the first ceil(N x 13 / 24)); Flux keeps its double/single
    proportion (19 : 38).
    """
    config = json.loads(json.dumps(config))
    d = config["denoiser"]
    if config["denoiser_class"] == "SD3Transformer2DModel":
        dual = len(d.get("dual_attention_layers", ()))
        d["dual_attention_layers"] = list(range(-(-blocks * dual // d["num_layers"])))
        d["num_layers"] = blocks
    elif config["denoiser_class"] == "FluxTransformer2DModel":
        total = d["num_layers"] + d["num_single_layers"]
        d["num_layers"] = max(1, round(blocks * d["num_layers"] / total))
        d["num_single_layers"] = max(1, blocks - d["num_layers"])
    else:
        raise SystemExit(f"bench_families: --blocks applies to MM-DiT transformers, not {config['denoiser_class']}")
    config["truncated_to_blocks"] = blocks
    return config


def build_full(config: dict[str, Any], seed: int, dtype: torch.dtype, device: str):
    """The pipeline class of ``config`` with its full-size denoiser and VAE (random weights), no text encoders."""
    import diffusers

    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: billions of random weights are drawn much faster there
        denoiser = getattr(diffusers, config["denoiser_class"])(**config["denoiser"])
        vae = diffusers.AutoencoderKL(**config["vae"])
    scheduler = getattr(diffusers, config["scheduler_class"]).from_config(config["scheduler"])
    cls = getattr(diffusers, config["pipeline"])
    parts: dict[str, Any] = {"vae": vae, "scheduler": scheduler}
    if config["denoiser_class"] == "UNet2DConditionModel":
        parts |= dict(unet=denoiser, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None)
    else:
        parts["transformer"] = denoiser
        names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
        if config["pipeline"] == "StableDiffusion3Pipeline":
            names += ("text_encoder_3", "tokenizer_3")
        parts |= dict.fromkeys(names)
    pipe = cls(**parts)
    for module in (denoiser, vae):
        module.eval()  # from_pretrained returns eval-mode modules; do the same
        if dtype != torch.float32:  # .to() on a pipeline part warns even when it changes nothing
            module.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text_shapes(pipe, config: dict[str, Any] | None) -> dict[str, int]:
    """Tokens, width and pooled width of the prompt embeddings the denoiser expects."""
    if config is not None:
        return dict(config["text"])
    # tiny pipelines: read the shapes from the denoiser's config
    cfg = (pipe.unet if hasattr(pipe, "unet") else pipe.transformer).config
    name = type(pipe).__name__
    if name == "StableDiffusionXLPipeline":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return {"tokens": 77, "width": cfg.cross_attention_dim, "pooled": pooled}
    if name == "StableDiffusion3Pipeline":
        return {"tokens": 77 + 16, "width": cfg.joint_attention_dim, "pooled": cfg.pooled_projection_dim}
    if name == "FluxPipeline":
        return {"tokens": 16, "width": cfg.joint_attention_dim, "pooled": cfg.pooled_projection_dim}
    raise SystemExit(f"bench_families: {name} is not benchmarked here (SDXL, SD3/SD3.5 and Flux are)")


def embeddings(pipe, shapes: dict[str, int], seed: int, dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Random prompt embeddings (and pooled, negative) in the keywords of ``pipe``'s ``__call__``."""
    gen = torch.Generator().manual_seed(seed + 1)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    t, w, p = shapes["tokens"], shapes["width"], shapes["pooled"]
    kwargs = dict(prompt_embeds=draw(1, t, w), pooled_prompt_embeds=draw(1, p))
    if type(pipe).__name__ != "FluxPipeline":  # Flux-dev is guidance-distilled: no negative branch
        kwargs |= dict(negative_prompt_embeds=draw(1, t, w), negative_pooled_prompt_embeds=draw(1, p))
    return kwargs


def generate(pipe, call: dict[str, Any], traced: bool, device: str, trace_options: dict[str, Any]):
    """One timed generation; returns (wall seconds, CPU seconds of this process, output tensor, tracer or None)."""
    call = dict(call, generator=torch.Generator(device=device).manual_seed(call["seed"]))
    call.pop("seed")
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    tracer = None
    with torch.no_grad():
        if traced:
            with opendaam.trace(pipe, **trace_options) as tracer:
                out = pipe(**call).images
        else:
            out = pipe(**call).images
    sync(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    out = out if isinstance(out, torch.Tensor) else torch.as_tensor(out)
    return seconds, cpu_seconds, out.detach().cpu(), tracer


def profile_traced(pipe, call: dict[str, Any], device: str, trace_options: dict[str, Any], ops: bool,
                   top: int = 20):
    """One traced generation under cProfile (opendaam functions by own and cumulative time; the processor wrapper's
    cumulative time includes the original attention, the tracer's own work is under ``_observe`` and the
    recorders) and, with ``ops``, one untraced and one traced under torch.profiler (ops by self CPU time), so the
    extra time can be attributed."""
    result: dict[str, Any] = {}
    prof = cProfile.Profile()
    prof.enable()
    generate(pipe, call, True, device, trace_options)
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    rows = []
    for (file, line, func), (_, ncalls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        if "opendaam" in file:
            rows.append({"function": f"{Path(file).parent.name}/{Path(file).name}:{line}:{func}", "calls": ncalls,
                         "own_s": round(own, 3), "cumulative_s": round(cum, 3)})
    result["opendaam_by_cumulative"] = sorted(rows, key=lambda r: -r["cumulative_s"])[:top]
    result["opendaam_by_own"] = sorted(rows, key=lambda r: -r["own_s"])[:top]
    result["profiled_generation_seconds"] = round(sum(v[2] for v in stats.stats.values()), 3)  # type: ignore[attr-defined]
    if not ops:
        return result

    from torch.profiler import ProfilerActivity, profile

    table: dict[str, dict[str, float]] = {}
    for mode in ("untraced", "traced"):
        with profile(activities=[ProfilerActivity.CPU]) as p:
            generate(pipe, call, mode == "traced", device, trace_options)
        for event in p.key_averages():
            table.setdefault(event.key, {"untraced": 0.0, "traced": 0.0})[mode] = event.self_cpu_time_total / 1e6
    diff = [{"op": k, "untraced_s": round(v["untraced"], 3), "traced_s": round(v["traced"], 3),
             "extra_s": round(v["traced"] - v["untraced"], 3)} for k, v in table.items()]
    result["torch_ops_by_extra_self_cpu"] = sorted(diff, key=lambda r: -r["extra_s"])[:top]
    result["torch_ops_total_self_cpu_s"] = {m: round(sum(v[m] for v in table.values()), 3)
                                           for m in ("untraced", "traced")}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sdxl-base", help="a config in bench/configs, or tiny:<family>")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="untraced/traced pairs, order alternated")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--decode", action="store_true", help="decode with the VAE in both modes (default: latents)")
    parser.add_argument("--trace-options", default="{}",
                        help='JSON keywords for opendaam.trace, e.g. {"linear": false}')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-warmup", action="store_true", help="skip the 1-step traced warm-up")
    parser.add_argument("--blocks", type=int, default=None,
                        help="MM-DiT only: keep the first N transformer blocks (full width; see truncate())")
    parser.add_argument("--profile", action="store_true", help="profile one traced generation (see module doc)")
    parser.add_argument("--profile-ops", action="store_true",
                        help="with profiling, also run torch.profiler on one untraced and one traced generation")
    parser.add_argument("--target", type=float, default=1.05, help="profile automatically above this ratio")
    parser.add_argument("--no-profile", action="store_true", help="never profile, whatever the ratio")
    parser.add_argument("--out", default=None, help="JSON path (default: run <model>_<date> added to "
                        "bench/results/families.json)")
    args = parser.parse_args(argv)
    try:
        args.trace_options = json.loads(args.trace_options)
    except json.JSONDecodeError as err:
        parser.error(f"--trace-options is not JSON ({err}); pass e.g. '{{\"linear\": false}}'")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")
    args.run_name = None
    if args.out is None:  # one file per benchmark: this run joins the earlier ones by name
        args.out = "bench/results/families.json"
        args.run_name = f"{args.model.replace(':', '-')}_{datetime.now(timezone.utc):%Y-%m-%dT%H%M}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = None
    start = time.perf_counter()
    if args.model.startswith("tiny:"):
        from opendaam._tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(args.model[5:], seed=args.seed, dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
    else:
        config = load_config(args.model)
        if args.blocks:
            config = truncate(config, args.blocks)
        pipe = build_full(config, args.seed, dtype, args.device)
    build_seconds = time.perf_counter() - start
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    guidance = args.guidance if args.guidance is not None else (config or {}).get("guidance_scale", 5.0)
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps, guidance_scale=guidance,
                output_type="pt" if args.decode else "latent", seed=args.seed,
                **embeddings(pipe, text_shapes(pipe, config), args.seed, dtype, args.device))
    print(f"built {args.model} in {build_seconds:.1f} s ({sum(p.numel() for p in denoiser.parameters()) / 1e9:.3f} "
          f"B denoiser parameters)", file=sys.stderr, flush=True)

    if not args.no_warmup:  # one traced step runs every module the untraced generation runs, and the tracer
        generate(pipe, dict(call, num_inference_steps=1 if config else 2), True, args.device, args.trace_options)
    times: dict[str, list[float]] = {"untraced": [], "traced": []}
    cpu_times: dict[str, list[float]] = {"untraced": [], "traced": []}
    peaks = {"untraced": 0.0, "traced": 0.0}
    loads = []
    outputs: dict[str, torch.Tensor] = {}
    identical: list[bool] = []
    max_diff: list[float] = []
    tracer = None
    for r in range(args.rounds):
        order = ("untraced", "traced") if r % 2 == 0 else ("traced", "untraced")
        for mode in order:
            reset_peak_memory(args.device)
            seconds, cpu_seconds, out, t = generate(pipe, call, mode == "traced", args.device, args.trace_options)
            peaks[mode] = max(peaks[mode], peak_memory_mb(args.device))
            times[mode].append(seconds)
            cpu_times[mode].append(cpu_seconds)
            outputs[mode] = out
            tracer = t or tracer
            loads.append(os.getloadavg()[0])
            print(f"round {r} {mode}: {seconds:.2f} s, CPU {cpu_seconds:.2f} s (load {loads[-1]:.2f})",
                  file=sys.stderr, flush=True)
        identical.append(bool(torch.equal(outputs["traced"], outputs["untraced"])))
        max_diff.append(float((outputs["traced"].float() - outputs["untraced"].float()).abs().max()))

    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["traced"] / med["untraced"]
    record = tracer.records[0]
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, python {platform.python_version()}",
        "versions": {"torch": torch.__version__, "diffusers": __import__("diffusers").__version__,
                     "opendaam": getattr(opendaam, "__version__", "?")},
        "model": args.model,
        "hub_id": (config or {}).get("hub_id"),
        "pipeline": type(pipe).__name__,
        "denoiser_parameters": sum(p.numel() for p in denoiser.parameters()),
        "denoiser_config_changes": ({"num_layers": config["denoiser"].get("num_layers"),
                                     "dual_attention_layers": config["denoiser"].get("dual_attention_layers"),
                                     "num_single_layers": config["denoiser"].get("num_single_layers"),
                                     "why": "truncate() in this script: full width, fewer blocks, to fit the time"}
                                    if config and config.get("truncated_to_blocks") else None),
        "weights": "random (seeded), full-size architecture from bench/configs" if config else "tiny random",
        "text_encoders": "none: random prompt_embeds / pooled / negative embeddings of the model's shapes",
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "size": args.size, "steps": args.steps, "rounds": args.rounds, "guidance_scale": guidance,
        "cfg_in_batch": type(pipe).__name__ != "FluxPipeline",
        "output": "VAE-decoded image tensor" if args.decode else "latents (no VAE decode in either mode)",
        "trace": "opendaam.trace(pipe" + "".join(f", {k}={v!r}" for k, v in args.trace_options.items()) + ")",
        "trace_config": asdict(tracer.config),
        "recorders": [type(r).__name__ for r in tracer.recorders],
        "traced_layers": len(tracer.layers),
        "record_bytes": record.nbytes(),
        "record_daam_shape_first_layer": list(next(iter(record.daam.values())).shape) if record.daam else None,
        "build_seconds": build_seconds,
        "seconds": times,
        "median_seconds": med,
        "ratio_traced_to_untraced": ratio,
        "ratio_of_minima": min(times["traced"]) / min(times["untraced"]),
        "cpu_seconds": cpu_times,
        "median_cpu_seconds": {k: statistics.median(v) for k, v in cpu_times.items()},
        "ratio_cpu_traced_to_untraced": statistics.median(cpu_times["traced"]) / statistics.median(
            cpu_times["untraced"]),
        "why_cpu_seconds": "process CPU time (all threads) is far less sensitive than wall time to other "
                           "processes sharing the cores; on CUDA it only counts the host side",
        "target_ratio": args.target,
        "meets_target": ratio <= args.target,
        "identical_outputs": all(identical),
        "max_abs_output_diff": max(max_diff),
        "peak_memory_mb": peaks,
        "peak_memory_kind": "CUDA max_memory_allocated" if args.device.startswith("cuda") else "process VmHWM (RSS)",
        "load_average_1min_after_each_generation": loads,
        "note_on_load": "other processes shared the CPU; rounds are alternated so both modes see the same load",
    }
    if not args.no_profile and (args.profile or ratio > args.target):
        print("profiling one traced generation ...", file=sys.stderr, flush=True)
        result["profile"] = profile_traced(pipe, call, args.device, args.trace_options, args.profile_ops)
    if args.run_name is None:
        write_json(args.out, result)
    else:
        add_run(args.out, args.run_name, result)
    print(json.dumps({k: result[k] for k in ("model", "median_seconds", "ratio_traced_to_untraced",
                                             "identical_outputs", "peak_memory_mb")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
