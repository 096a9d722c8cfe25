"""Tiny random-weight pipelines of every supported text-to-image family, built offline.

For tests and benchmarks: each is a real diffusers pipeline (the class a hub checkpoint of that family loads as),
with its attention laid out like the full-size model (two CLIP encoders of different widths for SDXL, a padded T5
context for PixArt, CLIP + T5 joint attention for SD3, dual attention and RMS q/k norms for SD3.5, double- and
single-stream blocks for Flux), but with 30-125 thousand denoiser weights, so two denoising steps take well under a
second.

Tokenizers are built without downloads: CLIP from the BPE files shipped in ``assets/clip_tokenizer``, T5 as an
in-memory unigram vocabulary of whole words (``"▁car"``) taken from the CLIP vocabulary, subword pieces and single
characters, so common words are one T5 token and rare ones split into pieces, as with the real T5.

Sits beside :mod:`opendaam.models` in the first layer; it imports nothing later.
"""

from __future__ import annotations

import inspect
import json
from functools import lru_cache
from typing import Any

import torch

__all__ = ["FAMILIES", "build_tiny_pipeline", "tiny_t5_tokenizer"]

FAMILIES = ("sdxl", "pixart-alpha", "pixart-sigma", "sd3", "sd3.5", "flux")
"""Families :func:`build_tiny_pipeline` builds, as named in issue 15."""

_CLIP = dict(  # CLIP text encoder shared by all families; vocabulary of the shipped tokenizer
    vocab_size=49408,  # the shipped BPE vocabulary, so real prompts tokenize as in the full models
    hidden_size=32,  # tiny width; SDXL's second encoder overrides it so the two differ as in the real model
    intermediate_size=37,  # odd on purpose, as in diffusers' own tests, to catch shape mix-ups
    num_attention_heads=4,  # divides every hidden size used here
    num_hidden_layers=3,  # SDXL and SD3 read the penultimate layer, so at least two
    max_position_embeddings=77,  # CLIP's context length
    projection_dim=32,  # pooled projection width (SDXL's text_embeds, SD3's pooled prompt)
    hidden_act="gelu",  # as SD 2 / SDXL's OpenCLIP
    bos_token_id=49406,  # ids of the shipped tokenizer's start and end tokens
    eos_token_id=49407,  # pooled output is read at the first end token
    pad_token_id=49407,  # SD 1 style padding with the end token
)
_T5 = dict(  # T5 v1.1 encoder layout, tiny
    d_model=32,  # PixArt's caption_channels and Flux's joint_attention_dim; SD3 overrides (CLIP widths pad into it)
    d_kv=8,  # per-head width
    d_ff=37,  # odd on purpose
    num_layers=2,  # two blocks so the relative position bias and a residual path are both exercised
    num_heads=4,  # 4 x 8 = 32 inner width
    relative_attention_num_buckets=8,  # few buckets: prompts here are short
    feed_forward_proj="gated-gelu",  # T5 v1.1, the variant every family here uses
    dropout_rate=0.0,  # deterministic outputs
)
_VAE = dict(  # two levels: 2x down-sampling keeps latents small and non-square sizes meaningful
    in_channels=3,  # RGB
    out_channels=3,  # RGB
    block_out_channels=(4, 8),  # two levels -> vae_scale_factor 2
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),  # matches block_out_channels
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),  # matches block_out_channels
    layers_per_block=1,  # the minimum
    norm_num_groups=1,  # channel counts this small divide only by 1
    sample_size=32,  # unused by the pipelines here (height/width are always passed)
)
_T5_WORDS = 4000  # whole-word pieces: common words ("car", "tree") are one T5 token, rarer ones ("squirrel") split
_T5_SUBWORDS = 2000  # word-internal pieces, so rare words split into a few pieces rather than single letters


def _clip_config(**changes):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**_CLIP, **changes})


def _t5_encoder(vocab_size: int, **changes):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, **{**_T5, **changes}))


def _clip_tokenizer(pad_token: str = "<|endoftext|>"):
    from .models import clip_tokenizer  # imported here: models may one day import this module

    return clip_tokenizer(pad_token)


@lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """Unigram pieces and log-probabilities: specials, whole words, subwords, single characters."""
    from .models import TOKENIZER_DIR

    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    ranked = [piece for piece, _ in sorted(vocab.items(), key=lambda item: item[1])]
    words = [p[:-4] for p in ranked if p.endswith("</w>") and p[:-4].isascii() and p[:-4].isalpha()]
    subwords = [p for p in ranked if not p.endswith("</w>") and len(p) > 1 and p.isascii() and p.isalpha()]
    chars = [chr(c) for c in range(33, 127)]
    # Scores make fewer pieces win: a whole word beats any split, a subword beats its letters.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]
    pieces += [(f"▁{w}", -5.0) for w in words[:_T5_WORDS]]
    pieces += [(w, -7.0) for w in subwords[:_T5_SUBWORDS]]
    pieces += [(f"▁{c}", -9.0) for c in chars] + [(c, -10.0) for c in chars]
    seen: set[str] = set()
    return tuple(p for p in pieces if not (p[0] in seen or seen.add(p[0])))


def tiny_t5_tokenizer(model_max_length: int = 512):
    """A T5 unigram tokenizer built in memory: ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then pieces.

    Case-sensitive like T5; lower-case common words are single ``"▁word"`` tokens.

    Args:
        model_max_length: the tokenizer's default truncation length.

    Examples:
        >>> tok = tiny_t5_tokenizer()
        >>> tok.convert_ids_to_tokens(tok("a red car").input_ids)
        ['▁a', '▁red', '▁car', '</s>']
    """
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=model_max_length)


def _vae(**changes):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**{**_VAE, **changes})


def _sdxl(overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # Two encoders of different widths (32 and 48) as SDXL's 768 and 1280, so a key projection that sees only
    # one of them fails loudly; the U-Net's context is their concatenation (80 wide).
    text_encoder = CLIPTextModel(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden_size=48, projection_dim=40))
    unet = UNet2DConditionModel(**{**dict(
        block_out_channels=(8, 16),  # two levels: one down-sampling, two attention resolutions
        layers_per_block=1,  # the minimum
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),  # text attention at both resolutions
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),  # and on the way up
        attention_head_dim=(2, 4),  # heads per level, as diffusers' SDXL tests
        transformer_layers_per_block=(1, 2),  # SDXL stacks several transformer layers per block
        use_linear_projection=True,  # as SDXL
        cross_attention_dim=80,  # 32 + 48: the two encoders' hidden states concatenated
        addition_embed_type="text_time",  # SDXL's pooled-text + size/crop micro-conditioning
        addition_time_embed_dim=8,  # each of the 6 size/crop numbers embedded in 8
        projection_class_embeddings_input_dim=6 * 8 + 40,  # time ids + text_encoder_2's pooled projection
        norm_num_groups=1,  # channel counts this small divide only by 1
        sample_size=16,  # default latent size (32 px); calls pass height/width anyway
        in_channels=4,  # SDXL's VAE latent channels
        out_channels=4,  # epsilon prediction
    ), **overrides})
    scheduler = EulerDiscreteScheduler(  # SDXL base's scheduler configuration
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return dict(
        unet=unet, vae=_vae(latent_channels=4, force_upcast=False), scheduler=scheduler,
        text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer("!"),  # SDXL's second tokenizer pads with "!"
        image_encoder=None, feature_extractor=None,
    )


def _pixart(overrides: dict[str, Any], max_length: int) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tokenizer = tiny_t5_tokenizer(max_length)
    transformer = PixArtTransformer2DModel(**{**dict(
        sample_size=8,  # not 32/64/128: the pipeline's resolution binning is then refused, call with
        # use_resolution_binning=False (binning would resize 32x48 to a 256-px bin)
        num_layers=2,  # two cross-attention layers
        patch_size=2,  # as PixArt
        attention_head_dim=8,  # tiny
        num_attention_heads=3,  # 24 inner width
        caption_channels=_T5["d_model"],  # T5 width
        in_channels=4,  # latent channels
        out_channels=8,  # learned variance: the pipeline keeps the first 4 channels
        cross_attention_dim=24,  # = inner width, as PixArt
        attention_bias=True,  # as PixArt
        activation_fn="gelu-approximate",  # as PixArt
        num_embeds_ada_norm=1000,  # training timesteps
        norm_type="ada_norm_single",  # PixArt's adaLN-single
        norm_elementwise_affine=False,  # as PixArt
        norm_eps=1e-6,  # as PixArt
    ), **overrides})
    return dict(
        transformer=transformer, vae=_vae(latent_channels=4), scheduler=DPMSolverMultistepScheduler(),
        text_encoder=_t5_encoder(len(tokenizer)), tokenizer=tokenizer,
    )


def _sd3(overrides: dict[str, Any], dual: bool) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tokenizer_3 = tiny_t5_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(hidden_size=48, projection_dim=40))
    # SD3 concatenates the CLIP hidden states (32 + 48) and zero-pads them to T5's width before joining the T5
    # tokens on the sequence axis, so T5 must be at least 80 wide.
    text_encoder_3 = _t5_encoder(len(tokenizer_3), d_model=96, num_heads=4, d_kv=24)
    transformer = SD3Transformer2DModel(**{**dict(
        sample_size=16,  # positional-embedding grid base; calls pass height/width
        patch_size=2,  # as SD3
        in_channels=4,  # latent channels
        out_channels=4,  # flow prediction
        num_layers=2,  # the last block is context_pre_only (text keys read, text stream not updated)
        attention_head_dim=8,  # tiny
        num_attention_heads=4,  # 32 inner width
        joint_attention_dim=96,  # T5 width
        caption_projection_dim=32,  # = inner width, as SD3
        pooled_projection_dim=72,  # 32 + 40: both CLIP pooled projections
        pos_embed_max_size=32,  # cropped sin-cos grid, as SD3 (96 there)
        # SD3.5-medium: the first blocks add an image-only attention (attn2) and q/k are RMS-normed everywhere.
        dual_attention_layers=(0,) if dual else (),  # one dual block, one plain: both kinds in one model
        qk_norm="rms_norm" if dual else None,  # SD3.5's norm_q/norm_k/norm_added_q/norm_added_k
    ), **overrides})
    return dict(
        transformer=transformer, vae=_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5035,
                                          use_quant_conv=False, use_post_quant_conv=False),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # SD3's shift
        text_encoder=text_encoder, tokenizer=_clip_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=_clip_tokenizer("!"),
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
        image_encoder=None, feature_extractor=None,
    )


def _flux(overrides: dict[str, Any]) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer_2 = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(**{**dict(
        patch_size=1,  # Flux packs 2x2 latent patches itself
        in_channels=16,  # 4 latent channels x 2 x 2 packing
        num_layers=2,  # double-stream blocks
        num_single_layers=2,  # single-stream blocks ([text; image] in one sequence)
        attention_head_dim=16,  # = sum(axes_dims_rope)
        num_attention_heads=2,  # 32 inner width
        joint_attention_dim=_T5["d_model"],  # T5 width
        pooled_projection_dim=_CLIP["hidden_size"],  # Flux pools CLIPTextModel's hidden size (no projection)
        axes_dims_rope=(4, 4, 8),  # RoPE over (unused, row, column) ids
        guidance_embeds=False,  # schnell-like; pass guidance_embeds=True for a dev-like guidance-distilled model
    ), **overrides})
    return dict(
        transformer=transformer, vae=_vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611,
                                          use_quant_conv=False, use_post_quant_conv=False),
        scheduler=FlowMatchEulerDiscreteScheduler(  # FLUX.1's resolution-dependent shift
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096,
        ),
        text_encoder=CLIPTextModel(_clip_config()), tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(len(tokenizer_2)), tokenizer_2=tokenizer_2,
        image_encoder=None, feature_extractor=None,
    )


def build_tiny_pipeline(family: str, seed: int = 0, *, dtype: torch.dtype = torch.float32, **overrides):
    """A real diffusers pipeline of ``family`` with tiny random weights, built offline.

    Args:
        family: one of :data:`FAMILIES`.
        seed: seeds every weight, so two builds with the same seed are identical; the caller's global torch
            random state is left as it was.
        dtype: the weights' dtype; they are drawn in float32 first, so a bfloat16 build rounds the float32 one.
        **overrides: changes to the denoiser's config (``unet`` for SDXL, ``transformer`` otherwise), e.g.
            ``guidance_embeds=True`` for a guidance-distilled Flux or ``num_layers=3``.

    Returns:
        ``StableDiffusionXLPipeline``, ``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``,
        ``StableDiffusion3Pipeline`` (SD3 and SD3.5) or ``FluxPipeline``, on the CPU. Image sides must be
        multiples of 4 (the VAE halves them; SDXL's U-Net, SD3's and PixArt's patches and Flux's packing halve
        them again). PixArt needs ``use_resolution_binning=False``.

    Examples:
        >>> pipe = build_tiny_pipeline("sd3.5")
        >>> type(pipe).__name__, pipe.transformer.config.dual_attention_layers
        ('StableDiffusion3Pipeline', (0,))
        >>> import torch
        >>> out = pipe("a red car", height=32, width=48, num_inference_steps=2, output_type="np",
        ...            max_sequence_length=16, generator=torch.Generator().manual_seed(0))
        >>> out.images.shape
        (1, 32, 48, 3)
    """
    import diffusers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, not {dtype}")
    denoiser = {"sdxl": diffusers.UNet2DConditionModel, "flux": diffusers.FluxTransformer2DModel}.get(
        family, diffusers.SD3Transformer2DModel if family.startswith("sd3") else diffusers.PixArtTransformer2DModel
    )
    unknown = sorted(set(overrides) - set(inspect.signature(denoiser.__init__).parameters) - {"self"})
    if unknown:
        raise ValueError(f"{denoiser.__name__} has no config key {', '.join(unknown)}; see its __init__ for valid keys")
    with torch.random.fork_rng(devices=[]):  # seeded weights without moving the caller's random stream
        torch.manual_seed(seed)
        if family == "sdxl":
            parts, cls = _sdxl(overrides), diffusers.StableDiffusionXLPipeline
        elif family == "pixart-alpha":
            parts, cls = _pixart(overrides, max_length=120), diffusers.PixArtAlphaPipeline  # pipeline default 120
        elif family == "pixart-sigma":
            parts, cls = _pixart(overrides, max_length=300), diffusers.PixArtSigmaPipeline  # pipeline default 300
        elif family in ("sd3", "sd3.5"):
            parts, cls = _sd3(overrides, dual=family == "sd3.5"), diffusers.StableDiffusion3Pipeline
        else:
            parts, cls = _flux(overrides), diffusers.FluxPipeline
        for part in parts.values():
            if isinstance(part, torch.nn.Module):
                part.eval()  # as from_pretrained leaves them: the VAE in training mode decodes ~3e-7 differently
                if dtype != torch.float32:
                    # plain Module.to: diffusers' ModelMixin.to warns about modules to keep in float32, none here
                    torch.nn.Module.to(part, dtype=dtype)
    pipe = cls(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe
