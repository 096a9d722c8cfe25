"""Benchmark: overhead of dataset generation (tracing + labelling + writing + exports) over plain generation.

For the same (prompt, seed) items, alternates rounds of plain generation (``pipe(...)`` only, images kept in
memory) and of ``opendaam.dataset.generate`` into a fresh folder (trace, class maps, label maps, PNG/NPZ
files, manifest, filters, Cityscapes and COCO exports, card), and reports median wall times, the overhead
ratio (target <= 5%) and the per-stage split from the manifest's timing fields.

Models: ``toy-urban`` (the bundled model, 64 px), ``sd2-base`` (the exact Stable Diffusion 2-base
architecture with random weights; timing does not depend on the weights), ``tiny`` (smoke test), or a
pipeline folder.

Usage::

    python bench/bench_dataset.py --model toy-urban --threads 1 --items 8 --rounds 3 \\
        --out bench/results/dataset_toy.json
    python bench/bench_dataset.py --model sd2-base --size 256 --steps 30 --threads 1 --items 4 --rounds 2 \\
        --out bench/results/dataset_sd2.json
    python bench/bench_dataset.py --model tiny --size 32 --steps 2 --items 4 --rounds 1   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import add_run, sync  # bench/ is on sys.path when run as a script
from _malloc import use_tuned_malloc

from opendaam.dataset import expand_items, generate, parse_spec
from opendaam.models import build_pipeline, generation_defaults, load_pipeline, set_threads


def _spec(args, defaults: dict) -> dict:
    """A two-class spec with ``args.items`` items (half per class)."""
    per_class = max(args.items // 2, 1)
    return {
        "name": "bench",
        "model": args.model,
        "steps": args.steps or defaults["num_inference_steps"],
        "guidance": defaults["guidance_scale"],
        "height": args.size or defaults["height"],
        "width": args.size or defaults["width"],
        "seeds": {"start": 0, "count": per_class},
        "method": args.method,
        "classes": [{"name": "car", "prompts": ["a {} in an urban environment"]},
                    {"name": "person", "prompts": ["a {} in an urban environment"]}],
        "filter": {"area_percentiles": [5, 95]},
        "outputs": {"formats": args.formats},
    }


def _plain(pipe, items, spec) -> float:
    """Seconds to generate the items without opendaam."""
    start = time.perf_counter()
    for item in items:  # a CPU generator, as opendaam.dataset.generate uses on every device
        pipe(item.prompt, generator=torch.Generator().manual_seed(item.seed), output_type="np",
             num_inference_steps=spec.steps, guidance_scale=spec.guidance, height=spec.height, width=spec.width)
    sync(pipe.device.type)
    return time.perf_counter() - start


def _dataset(pipe, spec, root: Path, device: str) -> tuple[float, dict]:
    """Seconds for a whole dataset run into a fresh folder, and the summed manifest timings."""
    out = Path(tempfile.mkdtemp(dir=root))
    start = time.perf_counter()
    result = generate(spec, out, pipe=pipe, progress=False, device=device)
    seconds = time.perf_counter() - start
    assert result.finalized
    stages = {"generate_s": 0.0, "label_s": 0.0, "write_s": 0.0}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        for key, value in json.loads(line)["timing"].items():
            stages[key] += value
    stages["finalize_s"] = seconds - sum(stages.values())
    shutil.rmtree(out)
    return seconds, stages


def main() -> None:
    malloc = use_tuned_malloc()  # before anything is allocated: see bench/_malloc.py
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy-urban", help="toy-urban, sd2-base, tiny, or a pipeline folder")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="daam", choices=["daam", "open_vocab", "linear"])
    parser.add_argument("--formats", nargs="*", default=["cityscapes", "coco"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (both the plain and the dataset run)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device; use --device cpu")

    set_threads(args.threads)
    if args.model in ("sd2-base", "tiny", "sd15"):
        pipe = build_pipeline(args.model, seed=0)
    else:
        pipe = load_pipeline(args.model)
    pipe = pipe.to(args.device)
    pipe.set_progress_bar_config(disable=True)
    spec = parse_spec(_spec(args, generation_defaults(pipe)))
    items = expand_items(spec)
    root = Path(tempfile.mkdtemp(prefix="bench-dataset-"))
    plain, full, stages = [], [], []
    try:
        _plain(pipe, items[:1], spec)  # warm-up
        for _ in range(args.rounds):
            plain.append(_plain(pipe, items, spec))
            seconds, split = _dataset(pipe, spec, root, args.device)
            full.append(seconds)
            stages.append(split)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    p, d = statistics.median(plain), statistics.median(full)
    result = {
        "model": args.model, "size": [spec.height, spec.width], "steps": spec.steps, "items": len(items),
        "rounds": args.rounds, "threads": args.threads, "device": args.device, "malloc": malloc or "glibc defaults",
        "method": args.method, "formats": args.formats,
        "plain_s": round(p, 3), "dataset_s": round(d, 3), "overhead": round(d / p - 1.0, 4),
        "per_item_overhead_s": round((d - p) / len(items), 4),
        "plain_s_rounds": [round(v, 3) for v in plain], "dataset_s_rounds": [round(v, 3) for v in full],
        "stages_s (round nearest the median)": {
            k: round(v, 3) for k, v in stages[min(range(len(full)), key=lambda i: abs(full[i] - d))].items()},
        "torch": torch.__version__, "python": platform.python_version(),
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result, indent=2))
    print(f"overhead {100 * result['overhead']:.1f}% (target <= 5%)")
    if args.out:  # one file per benchmark: runs kept by name
        add_run(args.out, f"dataset_{args.model}_{result['when'][:16]}", result)


if __name__ == "__main__":
    main()
