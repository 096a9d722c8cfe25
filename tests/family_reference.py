"""Eager reference DAAM for every family, written to be read: a test oracle independent of opendaam's tracer.

It never touches attention processors. Plain forward pre-hooks record what each text-conditioned attention module
receives; the queries and text keys are recomputed here from the layer's own weights (projections, q/k norms, RoPE),
and the maps are the softmax of ``q k^T / sqrt(head_dim)`` over the text tokens only, for the image-query rows of
the conditional branch, summed over heads and denoising steps.

Layouts, as diffusers 0.42 runs them (see docs/dev/families.md):

- U-Net cross-attention (SDXL) and DiT cross-attention (PixArt): every key is a text token; PixArt adds the padding
  mask as a bias of -10000 to the scores, so padded tokens get probability 0 (exp underflows in float32).
- SD3/SD3.5 joint attention: one softmax over the keys ``[image; text]``; text keys are ``norm_added_k(add_k_proj(c))``.
- Flux double-stream blocks: keys ``[text; image]``, RoPE on all of them (the identity on text: its ids are 0).
  Single-stream blocks: one sequence ``[text; image]`` through ``to_q``/``to_k``; its text length is the length of the
  ``encoder_hidden_states`` the transformer was called with.
- Conditional rows: with classifier-free guidance in one batch (SDXL, PixArt, SD3) the second half of the batch.
  Flux true CFG calls the transformer twice per step, conditional first; the second call is skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxSingleTransformerBlock

__all__ = [
    "LayerReference", "Reference", "attention_inputs", "image_attention_output", "reference_daam",
    "text_conditioned_layers",
]


@dataclass
class LayerReference:
    """One layer's maps. Shapes ``(images, pixels, text_tokens)``, or with ``reduce=False``
    ``(steps, images, heads, pixels, text_tokens)``; ``text_mass`` lacks the last axis."""

    text_softmax: torch.Tensor  # softmax over the text keys only
    joint_slice: torch.Tensor | None = None  # MM-DiT: the text columns of the softmax over all keys
    text_mass: torch.Tensor | None = None  # MM-DiT: joint_slice summed over text tokens (per head and step)
    grid: tuple[int, int] = (0, 0)  # pixels = grid[0] * grid[1], row-major over the layer's latent grid


@dataclass
class Reference:
    layers: dict[str, LayerReference] = field(default_factory=dict)
    images: object = None  # the pipeline's output images
    steps: int = 0  # conditional denoiser calls seen


def _family(denoiser) -> str:
    if isinstance(denoiser, UNet2DConditionModel):
        return "unet"
    if isinstance(denoiser, PixArtTransformer2DModel):
        return "pixart"
    if isinstance(denoiser, SD3Transformer2DModel):
        return "sd3"
    if isinstance(denoiser, FluxTransformer2DModel):
        return "flux"
    raise TypeError(f"no reference for {type(denoiser).__name__}")


def text_conditioned_layers(denoiser) -> dict[str, tuple[str, torch.nn.Module]]:
    """Name -> (kind, module) of every attention that reads text, found by module type and configuration.

    kinds: ``"cross"`` (keys are all text), ``"joint_img_txt"`` (SD3), ``"joint_txt_img"`` (Flux double-stream),
    ``"single"`` (Flux single-stream).
    """
    found = {}
    single = {id(m.attn) for m in denoiser.modules() if isinstance(m, FluxSingleTransformerBlock)}
    for name, module in denoiser.named_modules():
        if isinstance(module, FluxAttention):
            if module.added_kv_proj_dim is not None:
                found[name] = ("joint_txt_img", module)
            elif id(module) in single:
                found[name] = ("single", module)
        elif isinstance(module, Attention):
            if module.is_cross_attention:
                found[name] = ("cross", module)
            elif module.added_kv_proj_dim is not None:  # SD3.5's attn2 has none: image-only
                found[name] = ("joint_img_txt", module)
    return found


def attention_inputs(args: tuple, kwargs: dict) -> dict:
    """An attention module's call as a dict: hidden_states, encoder_hidden_states, attention_mask, rotary.

    U-Net and PixArt blocks pass hidden_states by position and the rest by keyword; SD3 and Flux blocks pass all
    by keyword. (Processors see other layouts: FluxAttention hands its processor all four by position.)
    """
    names = ("hidden_states", "encoder_hidden_states", "attention_mask", "image_rotary_emb")
    inputs = {**dict(zip(names, args, strict=False)), **{k: v for k, v in kwargs.items() if k in names}}
    inputs["rotary"] = inputs.pop("image_rotary_emb", None)
    return inputs


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def _norm(norm, x: torch.Tensor) -> torch.Tensor:
    return x if norm is None else norm(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x0, x1) of the last axis by the angles in cos/sin, in float32; x is (B, H, S, D)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (x.float() * cos + rotated * sin).to(x.dtype)


def _queries_and_text_keys(kind, attn, inputs, text_len):
    """Image queries (B, H, N, D), text keys (B, H, T, D) and, for joint attention, image keys (B, H, N, D)."""
    hidden, context, rotary = inputs["hidden_states"], inputs.get("encoder_hidden_states"), inputs.get("rotary")
    head_dim = attn.to_q.out_features // attn.heads
    image_keys = None
    if kind == "cross":
        q = _norm(attn.norm_q, _heads(attn.to_q(hidden), head_dim))
        k_text = _norm(attn.norm_k, _heads(attn.to_k(context), head_dim))
    elif kind in ("joint_img_txt", "joint_txt_img"):
        q = _norm(attn.norm_q, _heads(attn.to_q(hidden), head_dim))
        image_keys = _norm(attn.norm_k, _heads(attn.to_k(hidden), head_dim))
        k_text = _norm(attn.norm_added_k, _heads(attn.add_k_proj(context), head_dim))
    else:  # single-stream: hidden is [text; image]
        q = _norm(attn.norm_q, _heads(attn.to_q(hidden), head_dim))
        k = _norm(attn.norm_k, _heads(attn.to_k(hidden), head_dim))
        q, image_keys, k_text = q[:, :, text_len:], k[:, :, text_len:], k[:, :, :text_len]
    if rotary is not None:  # Flux: angles over [text; image]
        cos, sin = rotary
        t = k_text.shape[2]
        q = _rope(q, cos[t:], sin[t:])
        image_keys = _rope(image_keys, cos[t:], sin[t:])
        k_text = _rope(k_text, cos[:t], sin[:t])
    return q, k_text, image_keys


def _layer_maps(kind, attn, inputs, text_len):
    """Per-head maps of one call: text softmax, joint slice and text mass, each for all rows of the batch."""
    q, k_text, k_image = _queries_and_text_keys(kind, attn, inputs, text_len)
    scale = 1 / math.sqrt(q.shape[-1])
    text_scores = (q.float() @ k_text.float().transpose(-1, -2)) * scale  # (B, H, N, T)
    mask = inputs.get("attention_mask")
    if mask is not None:  # PixArt: (B, 1, T) bias, 0 or -10000
        text_scores = text_scores + mask.float()[:, None]
    text_softmax = text_scores.softmax(-1)
    if k_image is None:
        return text_softmax, None, None
    image_scores = (q.float() @ k_image.float().transpose(-1, -2)) * scale  # (B, H, N, N)
    joint = torch.cat([image_scores, text_scores], dim=-1).softmax(-1)  # order does not change the softmax
    joint_slice = joint[..., image_scores.shape[-1]:]
    return text_softmax, joint_slice, joint_slice.sum(-1)


def image_attention_output(kind, attn, inputs, text_len=0) -> torch.Tensor:
    """The layer's output at the image rows, rebuilt from this module's probabilities: checks the oracle itself.

    Softmax over every key the layer has (text only for cross-attention; ``[image; text]`` for joint and
    single-stream attention), times the values, through the output projection where the layer has one.
    """
    hidden, context = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    q, k_text, k_image = _queries_and_text_keys(kind, attn, inputs, text_len)
    head_dim = q.shape[-1]
    if kind == "cross":
        keys, values = k_text, _heads(attn.to_v(context), head_dim)
    elif kind == "single":
        v = _heads(attn.to_v(hidden), head_dim)
        keys, values = torch.cat([k_image, k_text], 2), torch.cat([v[:, :, text_len:], v[:, :, :text_len]], 2)
    else:
        keys = torch.cat([k_image, k_text], 2)
        values = torch.cat([_heads(attn.to_v(hidden), head_dim), _heads(attn.add_v_proj(context), head_dim)], 2)
    scores = (q @ keys.transpose(-1, -2)) / math.sqrt(head_dim)
    if inputs.get("attention_mask") is not None:
        scores = scores + inputs["attention_mask"][:, None]
    out = (scores.softmax(-1) @ values).transpose(1, 2).flatten(2)
    return out if kind == "single" else attn.to_out[0](out)


def reference_daam(pipe, prompt, *, height: int, width: int, layers=None, reduce: bool = True, **call_kwargs):
    """Run ``pipe(prompt, height=..., width=..., **call_kwargs)`` and compute DAAM eagerly for ``layers``.

    Args:
        pipe: a diffusers pipeline of a supported family.
        prompt: a prompt or a list of prompts.
        height, width: image size, needed to lay pixels out on each layer's grid.
        layers: names of attention modules (default: every text-conditioned one).
        reduce: sum over steps and heads; False keeps both axes.
        **call_kwargs: passed to the pipeline (``num_images_per_prompt``, ``guidance_scale``, ...).
    """
    if call_kwargs.get("skip_guidance_layers"):
        raise ValueError("the reference does not route SD3's skip-layer guidance call")
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    family = _family(denoiser)
    found = text_conditioned_layers(denoiser)
    chosen = list(found) if layers is None else list(layers)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    images = len(prompts) * call_kwargs.get("num_images_per_prompt", 1)
    true_cfg = family == "flux" and call_kwargs.get("true_cfg_scale", 1.0) > 1 and (
        call_kwargs.get("negative_prompt") is not None or call_kwargs.get("negative_prompt_embeds") is not None
    )
    state = {"calls": 0, "conditional": False, "rows": slice(None), "text_len": 0}
    per_step: dict[str, list] = {name: [] for name in chosen}

    def on_denoiser(module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        batch = sample.shape[0]
        state["conditional"] = not (true_cfg and state["calls"] % 2 == 1)
        state["rows"] = slice(images, 2 * images) if batch == 2 * images else slice(0, batch)
        context = kwargs.get("encoder_hidden_states")
        state["text_len"] = 0 if context is None else context.shape[1]
        state["calls"] += 1

    def on_attention(name, kind):
        def hook(module, args, kwargs):
            if not state["conditional"]:
                return
            with torch.no_grad():
                maps = _layer_maps(kind, module, attention_inputs(args, kwargs), state["text_len"])
            rows = state["rows"]
            per_step[name].append(tuple(None if m is None else m[rows] for m in maps))

        return hook

    handles = [denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True)]
    for name in chosen:
        if name not in found:
            raise KeyError(f"{name!r} is not a text-conditioned attention layer; choose from {sorted(found)}")
        kind, module = found[name]
        handles.append(module.register_forward_pre_hook(on_attention(name, kind), with_kwargs=True))
    try:
        out = pipe(prompt, height=height, width=width, **call_kwargs)
    finally:
        for handle in handles:
            handle.remove()

    result = Reference(images=out.images, steps=len(next(iter(per_step.values()))) if per_step else 0)
    for name, steps in per_step.items():
        stacked = [None if steps[0][i] is None else torch.stack([s[i] for s in steps]) for i in range(3)]
        if reduce:  # (steps, images, heads, ...) -> (images, ...)
            stacked = [None if m is None else m.sum(dim=(0, 2)) for m in stacked]
        pixels = stacked[0].shape[-2]
        factor = math.isqrt(height * width // pixels)
        result.layers[name] = LayerReference(*stacked, grid=(height // factor, width // factor))
    return result
