"""Benchmark: wall time, time per stage and peak memory of the synthetic-to-real experiment on toy-urban.

Runs :func:`opendaam.segmenter.run_segmenter` (what ``opendaam experiment segmenter`` runs) into ``--dir`` from
scratch and stores, as run ``--name`` of ``bench/results/segmenter.json``: the wall time against the issue's
budget (20 minutes for the default sizes on 2 cores), the time of each stage (real sets, tokens, each synthetic
set, each segmenter), the peak resident memory, the sizes and the mIoU table the run measured.

Usage::

    python bench/bench_segmenter.py --threads 2 --dir runs/seg-default --name default
    python bench/bench_segmenter.py --threads 2 --per-class 128 --test 512 --train-steps 3000 \\
        --dir runs/seg-large --name large
"""

from __future__ import annotations

import argparse
import platform
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from _common import add_run, cpu_model, peak_memory_mb, reset_peak_memory  # bench/ is on sys.path as a script

from opendaam.models import load_pipeline, set_threads
from opendaam.segmenter import SegmenterConfig, run_segmenter

BUDGET_S = 20 * 60
"""The issue's budget for the default sizes on this 2-core CPU."""


def main() -> None:
    d = SegmenterConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machine has 2 cores)")
    parser.add_argument("--per-class", type=int, default=d.train_per_class)
    parser.add_argument("--test", type=int, default=d.test_size)
    parser.add_argument("--train-steps", type=int, default=d.train_steps)
    parser.add_argument("--dir", type=Path, required=True, help="the run's folder (emptied first)")
    parser.add_argument("--name", default="default", help="run name in the results file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "segmenter.json")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.dir.exists():
        shutil.rmtree(args.dir)  # a timing run starts from nothing: a resumed run would skip finished stages
    config = SegmenterConfig(train_per_class=args.per_class, test_size=args.test, train_steps=args.train_steps,
                             threads=args.threads)
    reset_peak_memory()
    started = time.perf_counter()
    pipe = load_pipeline("toy-urban")
    pipe.set_progress_bar_config(disable=True)
    summary = run_segmenter(pipe, args.dir, config, progress=False)
    wall = time.perf_counter() - started
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(), "cores": torch.get_num_threads(), "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_s": round(wall, 1), "budget_s": BUDGET_S, "within_budget": wall <= BUDGET_S,
        "stages_s": summary["time_s"], "peak_rss_mb": round(peak_memory_mb(), 1),
        "sizes": summary["sizes"], "miou": summary["miou"], "targets": summary["targets"],
        "iou": summary["iou"], "config": summary["config"],
    }
    add_run(args.out, args.name, result)
    print(f"{args.name}: {wall:.0f} s (budget {BUDGET_S} s), peak {result['peak_rss_mb']:.0f} MiB; "
          f"mIoU {summary['miou']}")


if __name__ == "__main__":
    main()
