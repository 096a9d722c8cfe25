"""Memory per image of what opendaam records, computed from the official configs (no generation).

For SDXL base, SD3.5 medium and large and FLUX.1-dev (``bench/configs/<model>.json``) at ``--size`` pixels and
``--steps`` denoiser calls it computes, per image:

* **DAAM sums**: one ``(heads, N_l, T)`` float32 tensor per text-conditioned layer, as ``Record.daam`` stores them,
  and the head-summed ``(N_l, T)`` alternative;
* **the replay record** that open-vocabulary maps of MM-DiT models need (new words' keys depend on the image
  stream, so cached queries are not enough): the conditional latent the denoiser got at each step, the step's
  timestep, the conditional prompt embeddings and pooled embeddings, and Flux's guidance value;
* **the query cache**: every text-conditioned layer's image queries, ``steps x N_l x inner_l``, in float16 and in
  int8 with one float16 scale per head and pixel.

The formulas read only the configs. They are verified, not just written: the layer count and head count per layer
against the layers opendaam's own adapter finds in each model built on the ``meta`` device (no memory); the U-Net
query cache of SD 2-base against :func:`opendaam.cache.query_cache_bytes` (0.716 GB at 512 px, 31 calls); and
DAAM, query-cache (fp16 and int8) bytes against ``record.nbytes()`` of real traced tiny SDXL, SD3.5 and Flux
generations computed with the same formulas.

Usage::

    python bench/bench_memory.py --size 1024 --steps 28 --out bench/results/memory_families.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_json  # noqa: E402

CONFIGS = Path(__file__).resolve().parent / "configs"
MODELS = ("sdxl-base", "sd3.5-medium", "sd3.5-large", "flux-dev")
F32, F16 = 4, 2


@dataclass(frozen=True)
class Layer:
    """One text-conditioned attention layer's shape at a given image size."""

    heads: int
    head_dim: int
    pixels: int  # image queries N_l

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


def _per_level(value, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


def unet_layers(cfg: dict[str, Any], height: int, width: int, vae_scale: int) -> list[Layer]:
    """Cross-attention layers of a ``UNet2DConditionModel`` config (SD 1/2, SDXL), in model order."""
    channels = list(cfg["block_out_channels"])
    levels = len(channels)
    # diffusers reads attention_head_dim as the number of heads when num_attention_heads is not set
    heads = _per_level(cfg.get("num_attention_heads") or cfg["attention_head_dim"], levels)
    tpb = _per_level(cfg.get("transformer_layers_per_block", 1), levels)
    per_block = _per_level(cfg.get("layers_per_block", 2), levels)
    h, w = height // vae_scale, width // vae_scale
    pixels = []
    for _ in channels:
        pixels.append(h * w)
        h, w = -(-h // 2), -(-w // 2)

    def block(level: int, count: int) -> list[Layer]:
        return [Layer(heads[level], channels[level] // heads[level], pixels[level])] * count

    layers: list[Layer] = []
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            layers += block(i, per_block[i] * tpb[i])
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "CrossAttn" in mid:
        layers += block(levels - 1, tpb[-1])
    for i, kind in enumerate(cfg["up_block_types"]):
        level = levels - 1 - i
        if "CrossAttn" in kind:  # up blocks have one more layer and the reversed per-level lists
            layers += block(level, (per_block[level] + 1) * tpb[level])
    return layers


def transformer_layers(cls: str, cfg: dict[str, Any], height: int, width: int, vae_scale: int) -> list[Layer]:
    """Text-conditioned attention layers of an SD3 or Flux transformer config."""
    h, w = height // vae_scale, width // vae_scale
    heads, dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    if cls == "SD3Transformer2DModel":  # every block's joint attention; SD3.5's image-only attn2 reads no text
        p = cfg.get("patch_size", 2)
        return [Layer(heads, dim, (h // p) * (w // p))] * cfg["num_layers"]
    if cls == "FluxTransformer2DModel":  # latents packed 2x2: double- and single-stream blocks all read the text
        return [Layer(heads, dim, (h // 2) * (w // 2))] * (cfg["num_layers"] + cfg["num_single_layers"])
    raise ValueError(f"no layer formula for {cls}")


def layers_of(config: dict[str, Any], height: int, width: int) -> list[Layer]:
    vae_scale = 2 ** (len(config["vae"]["block_out_channels"]) - 1)
    if config["denoiser_class"] == "UNet2DConditionModel":
        return unet_layers(config["denoiser"], height, width, vae_scale)
    return transformer_layers(config["denoiser_class"], config["denoiser"], height, width, vae_scale)


def daam_bytes(layers: list[Layer], tokens: int) -> dict[str, int]:
    """DAAM sums as stored (``(heads, N, T)`` float32 per layer) and head-summed (``(N, T)``)."""
    return {"per_head_as_stored": sum(x.heads * x.pixels * tokens * F32 for x in layers),
            "head_summed": sum(x.pixels * tokens * F32 for x in layers)}


def query_cache_bytes(layers: list[Layer], calls: int) -> dict[str, int]:
    """Query cache: ``calls x N x inner`` per layer in float16, or int8 plus a float16 scale per head and pixel."""
    values = sum(x.pixels * x.inner for x in layers) * calls
    scales = sum(x.pixels * x.heads for x in layers) * calls
    return {"float16": values * F16, "int8": values + scales * F16, "int8_values": values, "int8_scales": scales * F16}


def replay_bytes(config: dict[str, Any], height: int, width: int, steps: int, bytes_per: int = F32) -> dict[str, Any]:
    """What replaying steps of an MM-DiT needs for the conditional image, per image (``None`` for U-Nets, whose
    keys do not depend on the image: the query cache is enough there)."""
    cls = config["denoiser_class"]
    if cls == "UNet2DConditionModel":
        return {"needed": False, "why": "U-Net cross-attention keys depend only on the text: the query cache suffices"}
    vae = config["vae"]
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    latent = vae["latent_channels"] * (height // scale) * (width // scale)  # Flux's packed latent has as many values
    text = config["text"]
    parts = {
        "latents": {"shape": f"{steps} x {latent} ({vae['latent_channels']} x {height // scale} x {width // scale})",
                    "bytes": steps * latent * bytes_per},
        "timesteps": {"shape": f"{steps}", "bytes": steps * F32},
        "prompt_embeds": {"shape": f"{text['tokens']} x {text['width']}",
                          "bytes": text["tokens"] * text["width"] * bytes_per},
        "pooled_prompt_embeds": {"shape": f"{text['pooled']}", "bytes": text["pooled"] * bytes_per},
    }
    if config["denoiser"].get("guidance_embeds"):
        parts["guidance"] = {"shape": "1", "bytes": F32}
    return {"needed": True, "dtype_bytes": bytes_per, "parts": parts,
            "total": sum(p["bytes"] for p in parts.values()),
            "not_stored": "unconditional branch (only the conditional image stream is replayed), Flux's text/image "
                          "position ids (rebuilt from the sizes), the noise (the per-step latents replace it)"}


def model_memory(model: str, size: int, steps: int) -> dict[str, Any]:
    config = json.loads((CONFIGS / f"{model}.json").read_text())
    layers = layers_of(config, size, size)
    tokens = config["text"]["tokens"]
    return {
        "hub_id": config["hub_id"],
        "text_tokens": tokens,
        "text_conditioned_layers": len(layers),
        "heads_per_layer": sorted({x.heads for x in layers}),
        "image_tokens_per_layer": sorted({x.pixels for x in layers}),
        "daam_bytes": daam_bytes(layers, tokens),
        "replay_bytes_float32": replay_bytes(config, size, size, steps, F32),
        "replay_bytes_bfloat16": replay_bytes(config, size, size, steps, 2),
        "query_cache_bytes": query_cache_bytes(layers, steps),
    }


# -- verification ----------------------------------------------------------------------------------------------
def check_layers_against_adapter(model: str, size: int) -> dict[str, Any]:
    """Build the full model on the meta device and compare layer count and heads with opendaam's adapter."""
    import diffusers

    from opendaam.tracing.adapters import ADAPTERS

    config = json.loads((CONFIGS / f"{model}.json").read_text())
    with torch.device("meta"):
        denoiser = getattr(diffusers, config["denoiser_class"])(**config["denoiser"])
    fake = type("P", (), {"unet" if config["denoiser_class"] == "UNet2DConditionModel" else "transformer": denoiser})
    adapter = next(a for a in ADAPTERS if a.matches(fake()))
    found = adapter.layers(denoiser)
    heads = sorted(m.heads for m in found.values())
    head_dims = sorted({m.to_q.out_features // m.heads for m in found.values()})
    ours = layers_of(config, size, size)
    agree = len(found) == len(ours) and heads == sorted(x.heads for x in ours) and head_dims == sorted(
        {x.head_dim for x in ours})
    return {"adapter_layers": len(found), "formula_layers": len(ours), "adapter_head_dims": head_dims,
            "agree": agree}


def check_sd2_query_cache() -> dict[str, Any]:
    """Our U-Net layer formula against opendaam.cache.query_cache_bytes for SD 2-base at 512 px, 31 calls."""
    from opendaam.cache import query_cache_bytes as reference
    from opendaam.models import ARCHITECTURES

    cfg = dict(ARCHITECTURES["sd2-base"].unet)
    ours = query_cache_bytes(unet_layers(cfg, 512, 512, 8), 31)["float16"]
    ref = reference(cfg, 512, 512, calls=31)
    return {"formula_bytes": ours, "opendaam_query_cache_bytes": ref, "agree": ours == ref,
            "gb": round(ours / 1e9, 3)}


def sdxl_query_cache_note(size: int, steps: int) -> dict[str, Any]:
    """opendaam.cache.query_cache_bytes on the SDXL config, beside the formula here (informational: it reads one
    transformer depth for every level, right for SD 1/2 only; the adapter check above confirms 70 layers)."""
    from opendaam.cache import query_cache_bytes as reference

    config = json.loads((CONFIGS / "sdxl-base.json").read_text())
    ours = query_cache_bytes(layers_of(config, size, size), steps)["float16"]
    return {"formula_bytes": ours, "opendaam_query_cache_bytes": reference(config["denoiser"], size, size, steps),
            "note": "opendaam.cache.query_cache_bytes takes transformer_layers_per_block[0] for every level and so "
                    "counts 11 of SDXL's 70 cross-attention layers; the formula here agrees with the adapter's 70"}


def check_tiny(family: str, size: tuple[int, int] = (32, 48), steps: int = 3) -> dict[str, Any]:
    """Trace a tiny pipeline (queries on, fp16 then int8) and compare record.nbytes() with the formulas."""
    from opendaam import trace
    from opendaam._tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    config = {"denoiser_class": type(denoiser).__name__, "denoiser": dict(denoiser.config),
              "vae": dict(pipe.vae.config)}
    height, width = size
    extra = {} if family == "sdxl" else {"max_sequence_length": 16}
    tokens = {"sdxl": 77, "flux": 16}.get(family, 77 + 16)
    layers = layers_of(config, height, width)
    out: dict[str, Any] = {"size": list(size), "steps": steps, "text_tokens": tokens}
    for dtype in ("float16", "int8"):
        with trace(pipe, queries=True, query_dtype=dtype) as tracer:
            pipe("a red car by a tree", height=height, width=width, num_inference_steps=steps, output_type="latent",
                 generator=torch.Generator().manual_seed(0), **extra)
        record = tracer.records[0]
        measured = record.nbytes()
        calls = len(record.steps)
        formula_q = query_cache_bytes(layers, calls)
        queries = measured["queries"] + measured.get("query_scales", 0)
        out[dtype] = {
            "recorded_calls": calls,
            "layers_recorded": len(record.layers), "layers_formula": len(layers),
            "daam_recorded": measured["daam"], "daam_formula": daam_bytes(layers, tokens)["per_head_as_stored"],
            "queries_recorded": queries, "queries_formula": formula_q["float16" if dtype == "float16" else "int8"],
        }
        o = out[dtype]
        o["agree"] = (calls == steps and o["layers_recorded"] == o["layers_formula"]
                      and o["daam_recorded"] == o["daam_formula"] and o["queries_recorded"] == o["queries_formula"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=28, help="denoiser calls recorded (one per step with CFG)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--device", default="cpu", help="accepted for symmetry: nothing here runs on a device "
                        "except the tiny cross-checks, which run on the CPU")
    parser.add_argument("--no-checks", action="store_true", help="skip the verification (formulas only)")
    parser.add_argument("--out", default="bench/results/memory_families.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "size": args.size, "steps": args.steps, "computed_from": "bench/configs/<model>.json (no generation)",
        "models": {m: model_memory(m, args.size, args.steps) for m in args.models},
    }
    if not args.no_checks:
        result["checks"] = {
            "layers_vs_adapter": {m: check_layers_against_adapter(m, args.size) for m in args.models},
            "sd2_base_query_cache_512px_31_calls": check_sd2_query_cache(),
            "sdxl_query_cache_bytes_of_opendaam_cache": sdxl_query_cache_note(args.size, args.steps),
            "tiny_traced_records": {f: check_tiny(f) for f in ("sdxl", "sd3.5", "flux")},
        }
        checks = result["checks"]
        ok = (all(c["agree"] for c in checks["layers_vs_adapter"].values())
              and checks["sd2_base_query_cache_512px_31_calls"]["agree"]
              and all(c[d]["agree"] for c in checks["tiny_traced_records"].values() for d in ("float16", "int8")))
        result["all_checks_agree"] = ok
    write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0 if result.get("all_checks_agree", True) else 1


if __name__ == "__main__":
    sys.exit(main())
