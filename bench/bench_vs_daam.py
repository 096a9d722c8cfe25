"""Benchmark: the original DAAM (0.2.0) and opendaam, traced / untraced, alternated in ONE run on SD 2-base.

DAAM pins diffusers 0.21.2 and so lives in its own environment (``bash bench/setup_daam_venv.sh`` makes
``/opt/daam-venv``). Each round runs, in an order swapped every round:

* DAAM: ``<daam venv python> bench/daam_baseline.py --rounds 1`` as a subprocess (a fresh process per round: it
  builds SD 2-base with random weights, warms up, then times one untraced and one DAAM-traced generation, the
  traced one followed by DAAM's global heat map and one word's map);
* opendaam, in this process (the pipeline built once): one untraced and one traced generation with the default
  ``opendaam.trace(pipe)``, the traced one followed by the DAAM map of the same word.

Same architecture (SD 2-base, random fp32 weights), prompt, size, steps, guidance, seed and thread count for both.
Each tool's ratio is against its own untraced median of the same run (their diffusers versions differ, so their
untraced times may too). Process CPU seconds (all threads) are reported beside wall seconds: they are much less
disturbed by other processes sharing the cores. Both processes run under the same fixed malloc settings
(bench/_malloc.py).

Usage::

    python bench/bench_vs_daam.py --size 256 --steps 10 --rounds 3 --threads 1 --out bench/results/vs_daam.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _malloc import use_tuned_malloc  # noqa: E402

PROMPT = "A car in an urban environment"  # the prompt and word of bench/daam_baseline.py
WORD = "car"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, the same for both tools")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--daam-python", default=os.environ.get("DAAM_VENV", "/opt/daam-venv") + "/bin/python",
                        help="python of the environment made by bench/setup_daam_venv.sh")
    parser.add_argument("--out", default="bench/results/vs_daam.json")
    args = parser.parse_args(argv)
    if not Path(args.daam_python).is_file():
        parser.error(f"no DAAM environment at {args.daam_python}: run `bash bench/setup_daam_venv.sh` first "
                     "(or pass --daam-python)")
    return args


def run_daam(args: argparse.Namespace) -> dict[str, Any]:
    """One DAAM round in its own environment; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "daam.json"
        cmd = [args.daam_python, str(HERE / "daam_baseline.py"), "--rounds", "1", "--threads", str(args.threads),
               "--size", str(args.size), "--steps", str(args.steps), "--guidance", str(args.guidance),
               "--seed", str(args.seed), "--device", args.device, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise SystemExit(f"bench_vs_daam: the DAAM round failed (exit {proc.returncode}): {tail}")
        return json.loads(out.read_text())


def opendaam_round(pipe, args: argparse.Namespace, warm_up: bool = True, traced_first: bool = False
                   ) -> dict[str, Any]:
    """One opendaam round: a 1-step traced warm-up, then untraced and traced + the word's DAAM map (as the DAAM
    round does), or traced first."""
    import numpy as np
    import torch
    from _common import peak_memory_mb, reset_peak_memory, sync

    from opendaam import heatmaps, trace

    def call():
        return dict(num_inference_steps=args.steps, height=args.size, width=args.size,
                    guidance_scale=args.guidance, output_type="np",
                    generator=torch.Generator(device=args.device).manual_seed(args.seed))

    def untraced_run():
        reset_peak_memory(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        images = pipe(PROMPT, **call()).images
        sync(args.device)
        result["untraced"] = time.perf_counter() - start
        result["cpu_untraced"] = time.process_time() - cpu_start
        result["peak_untraced"] = peak_memory_mb(args.device)
        return images

    def traced_run():
        reset_peak_memory(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        with trace(pipe) as tracer:
            images = pipe(PROMPT, **call()).images
        sync(args.device)
        generated = time.perf_counter()
        result["word_map_shape"] = list(heatmaps(tracer.records[0], [WORD]).latent.shape)
        result["traced_generate"] = generated - start
        result["traced_heat_maps"] = time.perf_counter() - generated
        result["traced"] = time.perf_counter() - start
        result["cpu_traced"] = time.process_time() - cpu_start
        result["peak_traced"] = peak_memory_mb(args.device)
        result["recorders"] = [type(r).__name__ for r in tracer.recorders]
        return images

    result: dict[str, Any] = {}
    if warm_up:  # as each DAAM round starts in a fresh process with a 1-step traced warm-up: no cold first run
        with trace(pipe):
            pipe(PROMPT, **dict(call(), num_inference_steps=1))
    if traced_first:
        traced, untraced = traced_run(), untraced_run()
    else:
        untraced, traced = untraced_run(), traced_run()
    result["identical"] = bool(np.array_equal(np.asarray(untraced), np.asarray(traced)))
    result["max_abs_diff"] = float(np.abs(np.asarray(untraced) - np.asarray(traced)).max())
    return result


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    malloc = use_tuned_malloc()  # before anything is allocated; inherited by the DAAM subprocesses
    args = parse_args(argv)
    import torch
    from _common import cpu_model, write_json

    from opendaam.models import build_pipeline, set_threads

    set_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_vs_daam: --device {args.device}: torch sees no CUDA device; use --device cpu")
    pipe = build_pipeline("sd2-base", seed=args.seed).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    opendaam_round(pipe, warm, warm_up=False)  # first warm-up of the process

    daam: list[dict[str, Any]] = []
    ours: list[dict[str, Any]] = []
    loads: list[float] = []
    for r in range(args.rounds):
        order = ("daam", "opendaam") if r % 2 == 0 else ("opendaam", "daam")
        for tool in order:
            if tool == "daam":
                daam.append(run_daam(args))
                s = daam[-1]["seconds"]
                print(f"round {r} daam: untraced {s['untraced'][0]:.1f} s, traced {s['traced'][0]:.1f} s",
                      file=sys.stderr, flush=True)
            else:
                ours.append(opendaam_round(pipe, args, traced_first=r % 2 == 1))
                print(f"round {r} opendaam: untraced {ours[-1]['untraced']:.1f} s, traced {ours[-1]['traced']:.1f} s",
                      file=sys.stderr, flush=True)
            loads.append(os.getloadavg()[0])

    def summary(untraced, traced, generate, maps, identical, diffs, peaks, cpu_u, cpu_t):
        med_u, med_t, med_g = _median(untraced), _median(traced), _median(generate)
        return {"seconds": {"untraced": untraced, "traced": traced, "traced_generate": generate,
                            "traced_heat_maps": maps, "cpu_untraced": cpu_u, "cpu_traced": cpu_t},
                "ratio_cpu_traced_to_untraced": _median(cpu_t) / _median(cpu_u),
                "median_seconds": {"untraced": med_u, "traced": med_t, "traced_generate": med_g,
                                   "traced_heat_maps": _median(maps)},
                "ratio_traced_to_untraced": med_t / med_u,
                "ratio_traced_generate_to_untraced": med_g / med_u,
                "ratio_of_minima": min(traced) / min(untraced),
                "identical_images": all(identical), "max_abs_image_diff": max(diffs),
                "peak_rss_mb": peaks}

    d = summary([x["seconds"]["untraced"][0] for x in daam], [x["seconds"]["traced"][0] for x in daam],
                [x["seconds"]["traced_generate"][0] for x in daam], [x["seconds"]["traced_heat_maps"][0] for x in daam],
                [bool(x["identical_images"]) for x in daam], [x["max_abs_image_diff"] for x in daam],
                {"untraced": max(x["peak_rss_mb"]["untraced"] for x in daam),
                 "traced": max(x["peak_rss_mb"]["traced"] for x in daam)},
                [x["seconds"]["cpu_untraced"][0] for x in daam], [x["seconds"]["cpu_traced"][0] for x in daam])
    d["versions"] = daam[0]["versions"]
    d["traced_error"] = next((x["traced_error"] for x in daam if x["traced_error"]), None)
    o = summary([x["untraced"] for x in ours], [x["traced"] for x in ours], [x["traced_generate"] for x in ours],
                [x["traced_heat_maps"] for x in ours], [x["identical"] for x in ours],
                [x["max_abs_diff"] for x in ours],
                {"untraced": max(x["peak_untraced"] for x in ours), "traced": max(x["peak_traced"] for x in ours)},
                [x["cpu_untraced"] for x in ours], [x["cpu_traced"] for x in ours])
    import diffusers

    import opendaam

    o["versions"] = {"opendaam": getattr(opendaam, "__version__", "?"), "diffusers": diffusers.__version__,
                     "torch": torch.__version__}
    o["trace"] = "opendaam.trace(pipe) (defaults), recorders " + ", ".join(ours[0]["recorders"])
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, python {platform.python_version()}",
        "architecture": "sd2-base (random fp32 weights, built from configs in both environments)",
        "prompt": PROMPT, "word": WORD, "size": args.size, "steps": args.steps, "rounds": args.rounds,
        "guidance": args.guidance, "seed": args.seed, "threads": args.threads, "device": args.device,
        "malloc": malloc or "glibc defaults",
        "how": "rounds alternate DAAM (subprocess in its venv, --rounds 1) and opendaam (in process), order swapped "
               "every round; each tool's ratio is against its own untraced median from the same run",
        "opendaam_round": "1-step traced warm-up, then untraced/traced, traced first in odd rounds",
        "daam": d,
        "opendaam": o,
        "load_average_1min_after_each_tool_round": loads,
    }
    write_json(args.out, result)
    print(json.dumps({"daam_ratio": d["ratio_traced_to_untraced"], "opendaam_ratio": o["ratio_traced_to_untraced"],
                      "daam_cpu_ratio": d["ratio_cpu_traced_to_untraced"],
                      "opendaam_cpu_ratio": o["ratio_cpu_traced_to_untraced"],
                      "daam_identical": d["identical_images"], "opendaam_identical": o["identical_images"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
