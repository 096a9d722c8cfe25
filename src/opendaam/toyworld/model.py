"""The toy-urban architecture: Stable Diffusion's component types at a size that trains on a CPU.

A diffusers ``AutoencoderKL`` with a factor-4 latent (64 x 64 images, 16 x 16 x 4 latents), a transformers
``CLIPTextModel`` with zero transformer layers (token and position embeddings and the final norm, so only
the word itself can carry the class: the lesson of the first prototype), and a ``UNet2DConditionModel``
with cross-attention at every resolution and in the middle block. Assembled as a
``StableDiffusionPipeline`` with Stable Diffusion's tokenizer and PNDM scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ToyConfig", "build_toy_pipeline", "toy_components"]


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy-urban model.

    Examples:
        >>> ToyConfig().unet_channels
        (32, 64, 128)
    """

    image_size: int = 64  # what the demo shows; the world renders 64 x 64 scenes
    vae_channels: tuple[int, ...] = (16, 32, 32)  # three levels: a factor-4 latent, 16 x 16 x 4; 0.4 s a batch
    unet_channels: tuple[int, ...] = (32, 64, 128)  # prototype 2's U-Net: 16, 8 and 4 pixel levels
    heads: int = 4  # prototype 2: 4 heads per cross-attention layer
    text_width: int = 64  # prototype 2: text width 64, also the cross-attention width
    text_layers: int = 0  # zero layers: a word's embedding cannot borrow the class from its neighbours
    norm_groups: int = 8  # divides every channel count above


def toy_components(config: ToyConfig | None = None, seed: int = 0) -> dict:
    """Randomly initialized ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` and ``scheduler``.

    Examples:
        >>> parts = toy_components()
        >>> parts["unet"].config.sample_size, len(parts["text_encoder"].encoder.layers)
        (16, 0)
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from opendaam.models import clip_tokenizer

    cfg = config or ToyConfig()
    torch.manual_seed(seed)
    levels = len(cfg.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=cfg.norm_groups,
        block_out_channels=cfg.vae_channels, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, sample_size=cfg.image_size,
    )
    latent = cfg.image_size // 2 ** (levels - 1)
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.unet_channels, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=cfg.text_width, attention_head_dim=cfg.heads, norm_num_groups=cfg.norm_groups,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=cfg.text_width, intermediate_size=4 * cfg.text_width, num_hidden_layers=cfg.text_layers,
        num_attention_heads=4, max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False,
                              steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), scheduler=scheduler)


def build_toy_pipeline(parts: dict):
    """A ``StableDiffusionPipeline`` from toy components (no safety checker: these are drawings).

    Examples:
        >>> pipe = build_toy_pipeline(toy_components())
        >>> type(pipe).__name__, pipe.vae_scale_factor
        ('StableDiffusionPipeline', 4)
    """
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
