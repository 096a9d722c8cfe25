"""Render bench/results/FAMILIES.md from the JSON results of bench_families.py, bench_memory.py and bench_vs_daam.py.

Usage::

    python bench/families_table.py            # reads bench/results/*.json, writes bench/results/FAMILIES.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
NOTES = ("<!-- notes: hand-written, kept on regeneration -->", "<!-- end of notes -->")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def timing_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["| model | size, steps, CFG | denoiser | untraced s (median) | traced s (median) | traced / untraced "
             "| ratio of minima | CPU-time ratio | outputs identical | peak RSS untraced / traced | threads, load avg "
             "| date |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        med = r["median_seconds"]
        change = r.get("denoiser_config_changes")
        denoiser = f"{r['denoiser_parameters'] / 1e9:.2f} B params"
        if change:
            denoiser += f", first {change['num_layers']} of the blocks (full width)"
        peaks = r["peak_memory_mb"]
        loads = r["load_average_1min_after_each_generation"]
        name = r["model"] if r["trace"] == "opendaam.trace(pipe)" else f"{r['model']}, `{r['trace']}`"
        cpu = f"**{r['ratio_cpu_traced_to_untraced']:.3f}x**" if "ratio_cpu_traced_to_untraced" in r else "n/a"
        lines.append(
            f"| {name} | {r['size']} px, {r['steps']} steps, guidance {r['guidance_scale']} | {denoiser} "
            f"| {med['untraced']:.1f} | {med['traced']:.1f} | {r['ratio_traced_to_untraced']:.3f}x "
            f"| {r['ratio_of_minima']:.3f}x | {cpu} | {'yes' if r['identical_outputs'] else 'NO'} "
            f"| {peaks['untraced'] / 1024:.1f} / {peaks['traced'] / 1024:.1f} GiB "
            f"| {r['threads']}, {min(loads):.1f}-{max(loads):.1f} | {r['date'][:16]} |")
    return lines


def profile_lines(r: dict[str, Any], top: int = 10) -> list[str]:
    """Where the traced generation's extra time goes: opendaam functions by cumulative seconds under cProfile."""
    prof = r.get("profile")
    if not prof:
        return []
    total = prof["profiled_generation_seconds"]
    skip = ("hooks.py", "tracer.py:534:trace")  # the processor wrappers include the model's own attention
    rows = [x for x in prof["opendaam_by_cumulative"] if not any(k in x["function"] for k in skip)][:top]
    lines = [f"Profile of one traced {r['model']} generation (cProfile, {total:.1f} s in all; cumulative seconds "
             "of opendaam functions, nested ones included in their callers; the processor wrappers are left out "
             "because they include the model's own attention):", "",
             "| function | calls | cumulative s | share of the generation |", "|---|---|---|---|"]
    lines += [f"| `{x['function']}` | {x['calls']} | {x['cumulative_s']:.2f} | {100 * x['cumulative_s'] / total:.1f}% |"
              for x in rows]
    return [*lines, ""]


def memory_table(mem: dict[str, Any]) -> list[str]:
    lines = [f"Per image at {mem['size']} px, {mem['steps']} denoiser calls, computed from the configs "
             "(no generation).", "",
             "| model | text-cond. layers x heads | image tokens / layer | text tokens | DAAM per head (as stored) "
             "| DAAM head-summed | replay record fp32 (bf16) | query cache fp16 | query cache int8 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, m in mem["models"].items():
        replay = m["replay_bytes_float32"]
        replay_s = (f"{_gb(replay['total'])} ({_gb(m['replay_bytes_bfloat16']['total'])})" if replay["needed"]
                    else "not needed (U-Net)")
        heads = "/".join(str(h) for h in m["heads_per_layer"])
        tokens = "/".join(str(n) for n in m["image_tokens_per_layer"])
        lines.append(f"| {name} | {m['text_conditioned_layers']} x {heads} | {tokens} | {m['text_tokens']} "
                     f"| {_gb(m['daam_bytes']['per_head_as_stored'])} | {_gb(m['daam_bytes']['head_summed'])} "
                     f"| {replay_s} | {_gb(m['query_cache_bytes']['float16'])} "
                     f"| {_gb(m['query_cache_bytes']['int8'])} |")
    first = next((m for m in mem["models"].values() if m["replay_bytes_float32"]["needed"]), None)
    if first:
        parts = first["replay_bytes_float32"]["parts"]
        lines += ["", "Replay record contents (conditional image only): " + "; ".join(
            f"{k} ({v['shape']})" for k, v in parts.items()) + ". Flux adds its guidance value. Not stored: "
            + first["replay_bytes_float32"]["not_stored"] + "."]
    checks = mem.get("checks")
    if checks:
        sd2 = checks["sd2_base_query_cache_512px_31_calls"]
        tiny = checks["tiny_traced_records"]
        lines += ["", "Checks (all agree: " + ("yes" if mem.get("all_checks_agree") else "NO") + "):",
                  "- layer count and heads per layer equal those opendaam's adapter finds in each model built on "
                  "the meta device: " + ", ".join(f"{k} {v['adapter_layers']}" for k, v in
                                                   checks["layers_vs_adapter"].items()) + " layers;",
                  f"- SD 2-base query cache at 512 px, 31 calls: {sd2['formula_bytes']:,} bytes = "
                  f"`opendaam.cache.query_cache_bytes` ({sd2['opendaam_query_cache_bytes']:,}, {sd2['gb']} GB);",
                  "- `record.nbytes()` of traced tiny generations (32x48 px, 3 steps, fp16 and int8 query caches) "
                  "equals the formulas for DAAM and queries: " + ", ".join(
                      f"{k} ({v['float16']['daam_recorded']:,} / {v['float16']['queries_recorded']:,} / "
                      f"{v['int8']['queries_recorded']:,} bytes)" for k, v in tiny.items()) + ".",
                  ]
        note = checks.get("sdxl_query_cache_bytes_of_opendaam_cache")
        if note:
            lines.append(f"- Note for the lead: `opendaam.cache.query_cache_bytes` gives "
                         f"{_gb(note['opendaam_query_cache_bytes'])} for SDXL at this size vs "
                         f"{_gb(note['formula_bytes'])} here: {note['note']}.")
    return lines


def daam_table(r: dict[str, Any]) -> list[str]:
    lines = [f"SD 2-base architecture, random fp32 weights, {r['size']} px, {r['steps']} steps, guidance "
             f"{r['guidance']}, {r['threads']} thread(s), {r['rounds']} alternated rounds, {r['date'][:16]} UTC, "
             f"{r['cpu']}, load average {min(r['load_average_1min_after_each_tool_round']):.1f}-"
             f"{max(r['load_average_1min_after_each_tool_round']):.1f}.", "",
             "| tool | diffusers | untraced s | traced s (generation + one word's map) | traced / untraced "
             "| generation only / untraced | ratio of minima | CPU-time ratio | images identical (max diff) "
             "| peak RSS traced |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("daam", "opendaam"):
        t = r[name]
        med = t["median_seconds"]
        lines.append(f"| {'DAAM 0.2.0' if name == 'daam' else 'opendaam'} | {t['versions']['diffusers']} "
                     f"| {med['untraced']:.1f} | {med['traced']:.1f} | {t['ratio_traced_to_untraced']:.3f}x "
                     f"| {t['ratio_traced_generate_to_untraced']:.3f}x | {t['ratio_of_minima']:.3f}x "
                     f"| **{t['ratio_cpu_traced_to_untraced']:.3f}x** "
                     f"| {'yes' if t['identical_images'] else 'no'} ({t['max_abs_image_diff']:.1e}) "
                     f"| {t['peak_rss_mb']['traced'] / 1024:.1f} GiB |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--out", default=str(RESULTS / "FAMILIES.md"))
    args = parser.parse_args(argv)
    root = Path(args.results)
    lines = ["# Tracing cost and memory across families (SDXL, SD3.5, Flux) and against the original DAAM", "",
             "Generated by `python bench/families_table.py` from the JSON files next to this one (the notes "
             "between the markers are kept from the previous file).", ""]
    out = Path(args.out)
    if out.is_file() and NOTES[0] in (old := out.read_text()) and NOTES[1] in old:
        lines += [old[old.index(NOTES[0]): old.index(NOTES[1]) + len(NOTES[1])], ""]
    else:
        lines += [NOTES[0], "", NOTES[1], ""]
    stored = json.loads((root / "families.json").read_text())["runs"] if (root / "families.json").exists() else {}
    runs = [run for run in stored.values() if not run["model"].startswith("tiny:")]
    if runs:
        lines += ["## Traced / untraced generation, full-size architectures, random weights", "",
                  "Default `opendaam.trace(pipe)` (DAAM sums; on SDXL also the linear matrix M, its default), "
                  "CFG in the batch, random `prompt_embeds`/pooled/negative embeddings of the model's shapes "
                  "instead of text encoders, latents out (no VAE decode in either mode), rounds alternated "
                  "(order swapped each round) in one process after a 1-step traced warm-up.", "",
                  *timing_table(runs), ""]
        for r in runs:
            secs = {k: [round(x, 1) for x in v] for k, v in r["seconds"].items()}
            cpu = {k: [round(x, 1) for x in v] for k, v in r.get("cpu_seconds", {}).items()}
            lines.append(f"- {r['model']}, `{r['trace']}`: {r['cpu']}; recorders {', '.join(r['recorders'])}; "
                         f"{r['traced_layers']} traced layers; all seconds untraced {secs['untraced']}, "
                         f"traced {secs['traced']}" + (f"; CPU seconds untraced {cpu['untraced']}, traced "
                                                        f"{cpu['traced']}." if cpu else "."))
        lines.append("")
        for r in runs:
            lines += profile_lines(r)
    mem_path = root / "memory_families.json"
    if mem_path.is_file():
        lines += ["## Memory per image", "", *memory_table(json.loads(mem_path.read_text())), ""]
    daam_path = root / "vs_daam.json"
    if daam_path.is_file():
        lines += ["## The original DAAM and opendaam in the same run", "",
                  *daam_table(json.loads(daam_path.read_text())), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
