"""Benchmark: per-epoch time per image of token optimization at the Stable Diffusion 2-base latent size.

Builds a record with the exact SD 2-base shapes at 512 x 512 (latent 64 x 64, text width 1024, 16
cross-attention layers, PNDM's 31 U-Net calls for 30 steps) filled with random queries (timing does not
depend on values; no generation is needed), then times, in one process:

* opendaam's linear optimization (one batched ``M x`` per epoch) and open-vocabulary optimization
  ([object, background] through the softmax of the cached queries), from an fp16 query cache (streamed in
  bfloat16) and from an int8 one (``trace(query_dtype="int8")``, streamed once per epoch as int8 codes
  through opendaam's fused native kernel, which returns each map with its Jacobian, and twice through
  torch's int8-weight matmul for comparison);
* a straightforward loop-per-timestep reimplementation (Python loops over steps and layers each epoch,
  each map upsampled and summed, as OVAM's optimizer does), for both methods.

With ``--int8-paths`` it times only the open-vocabulary epoch on the int8 cache, alternating in rounds
between the native kernel's paths (AVX-512 VNNI where the CPU has it, portable AVX2) and torch's int8-weight
matmul; run it again under ``ATEN_CPU_CAPABILITY=avx2`` to time torch's AVX2 kernels, as on a CPU without
AVX-512.

With ``--planted`` it measures what the optimizer finds instead (issue 16): on the bundled toy-urban model,
masks thresholded (min-max normalized map >= 0.5) from a random planted embedding (linear) or object /
background pair (open_vocab) on 5 images of each of 2 prompts; tokens start from "car", train on 3 images
and are scored by the max over ``metrics.default_thresholds`` of the mean IoU on those 3 and on the 2
held-out ones, for 3 planted seeds.

Usage::

    python bench/bench_optimize.py --threads 1 --epochs 5 --out bench/results/optimize.json
    python bench/bench_optimize.py --threads 2 --epochs 7 --images 2 --out bench/results/optimize.json
    python bench/bench_optimize.py --planted --out bench/results/optimize_planted.json
    ATEN_CPU_CAPABILITY=avx2 python bench/bench_optimize.py --threads 2 --int8-paths --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from _common import add_run, cpu_model  # bench/ is on sys.path when run as a script

from opendaam.models import ARCHITECTURES, cross_attention_layers, set_threads
from opendaam.optimize import optimize_token
from opendaam.tracing import LayerInfo, Record, build_linear_map


def synthetic_record(unet, size: int, calls: int, seed: int = 0) -> Record:
    """A record with SD-shaped random fp16 queries and the matching matrix M (no generation)."""
    gen = torch.Generator().manual_seed(seed)
    h = w = size // 8
    layers, queries, sums = {}, {}, {}
    # geometry: each block's level from its name (down_blocks.i: i, up_blocks.i: n-1-i, mid: n-1)
    n = len(unet.config.block_out_channels)
    for name, attn in cross_attention_layers(unet).items():
        if name.startswith("down_blocks"):
            level = int(name.split(".")[1])
        elif name.startswith("up_blocks"):
            level = n - 1 - int(name.split(".")[1])
        else:
            level = n - 1
        lh, lw = -(-h // 2**level), -(-w // 2**level)
        inner = attn.to_q.out_features
        info = LayerInfo(name=name, heads=attn.heads, head_dim=inner // attn.heads, scale=float(attn.scale),
                         height=lh, width=lw)
        layers[name] = info
        q = torch.randn(calls, info.heads, lh * lw, info.head_dim, generator=gen).to(torch.float16)  # (S, H, N, d)
        queries[name] = q
        sums[name] = q.float().sum(0).transpose(0, 1).reshape(lh * lw, inner)  # (N, inner)
    modules = cross_attention_layers(unet)  # build_linear_map reads each attention module's to_k
    m, bias = build_linear_map(sums, layers, modules, (h, w), "bicubic")
    meta = {"latent_size": [h, w], "image_size": [size, size], "text_dim": unet.config.cross_attention_dim,
            "steps": list(range(calls)), "calls": calls, "model": "sd2-base-random",
            "trace_config": {"upsample": "bicubic"}}
    return Record(meta=meta, layers=layers, queries=queries, linear_map=m, linear_bias=bias)


class _Pipe:
    """The parts of a pipeline that optimization reads: the U-Net (for keys)."""

    def __init__(self, unet):
        self.unet = unet


def loop_linear_epoch(record: Record, unet, x: torch.Tensor, target: torch.Tensor, optimizer) -> float:
    """One epoch of the loop-per-timestep linear approach: maps rebuilt from every step and layer."""
    modules = cross_attention_layers(unet)
    h, w = record.latent_size
    optimizer.zero_grad()
    total = torch.zeros(h, w)
    for name, info in record.layers.items():
        k = F.linear(x, modules[name].to_k.weight.detach())  # (inner,)
        for t in range(record.queries[name].shape[0]):
            q = record.queries[name][t].float().transpose(0, 1).reshape(info.pixels, -1)  # (N, inner)
            m = (q @ k).reshape(1, 1, info.height, info.width)
            total = total + F.interpolate(m, size=(h, w), mode="bicubic", align_corners=False)[0, 0]
    p = (total - total.min()) / (total.max() - total.min() + 1e-8)
    loss = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6).flatten(), target)
    loss.backward()
    optimizer.step()
    return float(loss)


def loop_open_vocab_epoch(record: Record, unet, x: torch.Tensor, target: torch.Tensor, optimizer) -> float:
    """One epoch of the loop-per-timestep open-vocabulary approach ([object, background] tokens)."""
    modules = cross_attention_layers(unet)
    h, w = record.latent_size
    optimizer.zero_grad()
    total = torch.zeros(2, h, w)
    for name, info in record.layers.items():
        k = F.linear(x, modules[name].to_k.weight.detach()).view(2, info.heads, info.head_dim)  # (2, H, d)
        for t in range(record.queries[name].shape[0]):
            q = record.queries[name][t].float()  # (H, N, d)
            probs = (torch.einsum("hnd,khd->hnk", q, k) * info.scale).softmax(-1).sum(0)  # (N, 2)
            m = probs.T.reshape(1, 2, info.height, info.width)
            total = total + F.interpolate(m, size=(h, w), mode="bicubic", align_corners=False)[0]
    flat = total.flatten(1)
    p = (flat - flat.amin(1, keepdim=True)) / (flat.amax(1, keepdim=True) - flat.amin(1, keepdim=True) + 1e-8)
    g = torch.stack([target, 1 - target])
    loss = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), g)
    loss.backward()
    optimizer.step()
    return float(loss)


def int8_record(record: Record) -> Record:
    """The same record with int8 queries and per-row scales, as ``trace(query_dtype="int8")`` stores them."""
    from opendaam.tracing import store_queries

    queries, scales = {}, {}
    for name, q in record.queries.items():
        queries[name], scales[name] = store_queries(q, "int8")  # (S, H, N, d) int8, (S, H, N) fp16
    return Record(meta=record.meta, layers=record.layers, queries=queries, query_scales=scales,
                  linear_map=record.linear_map, linear_bias=record.linear_bias)


def read_floor(record: Record, repeats: int = 7) -> float:
    """Seconds to read the record's query codes once from memory (the maximum of their bytes, a reduction as
    fast as a float sum here): the native kernel reads them once per epoch (map and Jacobian in one pass),
    so this is its memory floor; torch's int8 path reads them twice (forward and gradient)."""
    views = [q.view(torch.uint8) for q in record.queries.values()]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for v in views:
            v.amax()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_opendaam(records, pipe, method: str, epochs: int, mask, **options) -> float:
    """Seconds per epoch per image of :func:`optimize_token` on ``records`` (one record or several): the
    median time between the per-epoch callbacks, divided by the number of images (setup, such as laying out
    the query cache, is outside every interval)."""
    records = records if isinstance(records, list) else [records]
    kwargs = dict(init=torch.randn(records[0].meta["text_dim"]), method=method, pipe=pipe, progress=False,
                  size="latent", patience=10**6)
    stamps = []
    optimize_token(records, [mask] * len(records), epochs=epochs + 1,
                   callback=lambda entry: stamps.append(time.perf_counter()), **kwargs, **options)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False)) / len(records)


def planted(methods: tuple[str, ...] = ("linear", "open_vocab"), seeds: int = 3, **options) -> dict:
    """Max-over-thresholds IoU of tokens optimized on planted masks (see the module's docstring)."""
    import opendaam
    from opendaam.heatmaps import heatmaps
    from opendaam.metrics import default_thresholds, iou_score, threshold_curve

    pipe = opendaam.load_pipeline("toy-urban")
    pipe.set_progress_bar_config(disable=True)
    prompts = ("a car on a city street", "a person walking in the city")
    records = {}
    for p, prompt in enumerate(prompts):
        for s in range(5):
            with opendaam.trace(pipe, queries=True) as tracer:
                pipe(prompt, generator=torch.Generator().manual_seed(100 + s))
            records[p, s] = tracer.records[0]
    dim = records[0, 0].context.shape[1]

    def score(recs, rows, masks, method) -> float:
        maps = torch.stack([heatmaps(r, rows, method, pipe=pipe).soft[0] for r in recs])
        curve = threshold_curve(maps, torch.stack(masks), default_thresholds(), kind="minmax")
        return float(iou_score(curve).mean(1).max())

    out = {"prompts": list(prompts), "options": options, "runs": []}
    for method in methods:
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            for p in range(len(prompts)):
                recs = [records[p, s] for s in range(5)]
                scale = recs[0].context[1:6].norm(dim=-1).mean() / dim**0.5  # word-sized rows
                x = torch.randn(1 if method == "linear" else 2, dim, generator=gen) * scale
                rows = x[0] if method == "linear" else [x[0:1], x[1:2]]
                masks = [heatmaps(r, rows, method, pipe=pipe).normalized("minmax")[0] >= 0.5 for r in recs]
                start = time.perf_counter()
                token = optimize_token(recs[:3], [m.numpy() for m in masks[:3]], pipe=pipe, init="car",
                                       method=method, progress=False, **options)
                seconds = time.perf_counter() - start
                got = token.embedding[0] if method == "linear" else [token.embedding[0:1], token.embedding[1:2]]
                run = {"method": method, "seed": seed, "prompt": p, "train": score(recs[:3], got, masks[:3], method),
                       "held_out": score(recs[3:], got, masks[3:], method), "seconds": seconds,
                       "epochs_run": token.meta["epochs_run"]}
                print(json.dumps(run), flush=True)
                out["runs"].append(run)
    for method in methods:
        runs = [r for r in out["runs"] if r["method"] == method]
        out[method] = {f"{agg}_{k}": fn(r[k] for r in runs) for k in ("train", "held_out")
                       for agg, fn in (("min", min), ("mean", lambda v: statistics.mean(list(v))))}
    return out


def int8_paths(records, pipe, epochs: int, rounds: int, mask) -> dict:
    """Median seconds per epoch per image of the open-vocabulary epoch on int8 caches per path, the paths
    alternated in each round (so a slow spell of the machine hits all of them)."""
    from opendaam import _kernels

    int8s = [int8_record(r) for r in records]
    paths = {"torch": {"native": False}}
    for isa in _kernels.ISAS:
        if _kernels.available(isa):
            paths[f"native_{isa}"] = {}
    times = {name: [] for name in paths}
    previous = os.environ.get("OPENDAAM_NATIVE")
    try:
        for _ in range(rounds):
            for name, options in paths.items():
                if name.startswith("native_"):
                    os.environ["OPENDAAM_NATIVE"] = "avx2" if name == "native_avx2" else "1"
                    assert _kernels.isa() == name.removeprefix("native_")
                times[name].append(time_opendaam(int8s, pipe, "open_vocab", epochs, mask, **options))
    finally:
        if previous is None:
            os.environ.pop("OPENDAAM_NATIVE", None)
        else:
            os.environ["OPENDAAM_NATIVE"] = previous
    out = {"aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY", "default"),
           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "rounds": rounds,
           "s_per_epoch": {name: statistics.median(t) for name, t in times.items()},
           "all_s_per_epoch": times}
    med = out["s_per_epoch"]
    for name in med:
        if name != "torch":
            out[f"speedup_{name}_over_torch"] = med["torch"] / med[name]
    if "native_avx2" in med and "native_avx512" in med:
        out["avx2_over_avx512"] = med["native_avx2"] / med["native_avx512"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--calls", type=int, default=31, help="U-Net calls (PNDM: 31 for 30 steps)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--images", type=int, default=1,
                        help="training images per optimization (the thesis trains on 2); times are per image")
    parser.add_argument("--device", default="cpu",
                        help="only cpu: token optimization reads records, which opendaam keeps on the CPU, and its "
                             "int8 kernels are CPU kernels")
    parser.add_argument("--out", default="bench/results/optimize.json")
    parser.add_argument("--planted", action="store_true", help="measure recovery of planted tokens instead")
    parser.add_argument("--methods", nargs="+", default=["linear", "open_vocab"], help="with --planted")
    parser.add_argument("--options", default="{}", help="with --planted: optimize_token options as JSON")
    parser.add_argument("--int8-paths", action="store_true",
                        help="time only the open-vocabulary int8 epoch per kernel path, alternated in rounds")
    parser.add_argument("--rounds", type=int, default=5, help="with --int8-paths")
    args = parser.parse_args()
    if args.device != "cpu":
        parser.error(f"--device {args.device}: opendaam optimizes tokens on the CPU, where records live (the "
                     "generation is what an accelerator speeds up: see bench_tracing.py); use --device cpu")
    set_threads(args.threads)
    if args.planted:
        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
                  "threads": args.threads, "torch": torch.__version__,
                  **planted(tuple(args.methods), **json.loads(args.options))}
        add_run(args.out, f"planted_{result['date'][:16]}", result)  # one file per benchmark: runs kept by name
        return
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**ARCHITECTURES["sd2-base"].unet)
    records = [synthetic_record(unet, args.size, args.calls, seed=i) for i in range(args.images)]
    record = records[0]
    pipe = _Pipe(unet)
    h, w = record.latent_size
    mask = torch.zeros(h, w)
    mask[h // 4 : h // 2, w // 3 : 2 * w // 3] = 1

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "size": args.size, "latent": [h, w], "text_dim": record.meta["text_dim"], "calls": args.calls,
        "threads": args.threads, "device": args.device, "epochs": args.epochs, "images": args.images,
    }
    if args.int8_paths:
        result.update(int8_paths(records, pipe, args.epochs, args.rounds, mask))
        add_run(args.out, f"int8_paths_{result['aten_cpu_capability']}_{args.threads}threads_"
                f"{datetime.now(timezone.utc):%Y-%m-%dT%H%M}", result)
        print(json.dumps(result, indent=2))
        return
    result["linear_s_per_epoch"] = time_opendaam(records, pipe, "linear", args.epochs * 20, mask)
    result["open_vocab_s_per_epoch"] = time_opendaam(records, pipe, "open_vocab", args.epochs, mask)
    from opendaam import _kernels

    result["native_kernels"] = _kernels.available()
    result["native_isa"] = _kernels.isa()
    int8s = [int8_record(r) for r in records]
    int8 = int8s[0]
    result["open_vocab_int8_s_per_epoch"] = time_opendaam(int8s, pipe, "open_vocab", args.epochs, mask)
    result["open_vocab_int8_torch_s_per_epoch"] = time_opendaam(int8s, pipe, "open_vocab", args.epochs, mask,
                                                                native=False)
    result["int8_cache_bytes"] = sum(q.numel() for q in int8.queries.values())
    result["int8_cache_read_s"] = read_floor(int8)  # the native epoch's floor (torch int8: twice this)
    result["amx"] = _kernels.amx()
    for method, fn in (("linear", loop_linear_epoch), ("open_vocab", loop_open_vocab_epoch)):  # one image
        rows = 2 if method == "open_vocab" else 1
        x = torch.nn.Parameter(torch.randn(rows, record.meta["text_dim"])[0 if rows == 1 else slice(None)])
        opt = torch.optim.Adam([x], lr=0.1)
        times = []
        for _ in range(max(2, args.epochs // 2)):
            start = time.perf_counter()
            fn(record, unet, x, mask.flatten(), opt)
            times.append(time.perf_counter() - start)
        result[f"loop_{method}_s_per_epoch"] = statistics.median(times)
    result["speedup_linear"] = result["loop_linear_s_per_epoch"] / result["linear_s_per_epoch"]
    result["speedup_open_vocab"] = result["loop_open_vocab_s_per_epoch"] / result["open_vocab_s_per_epoch"]
    for key in ("int8", "int8_torch"):
        result[f"speedup_open_vocab_{key}"] = (result["loop_open_vocab_s_per_epoch"]
                                               / result[f"open_vocab_{key}_s_per_epoch"])
    add_run(args.out, f"optimize_{args.threads}threads_{args.images}images_"
            f"{datetime.now(timezone.utc):%Y-%m-%dT%H%M}", result)  # one file per benchmark: runs kept by name
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
