"""Loading diffusers pipelines, building offline ones from configs, finding cross-attention layers.

First layer of opendaam: nothing here imports another opendaam module.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "DENOISERS",
    "BUNDLED_MODELS",
    "SCHEDULERS",
    "Architecture",
    "build_pipeline",
    "check_denoiser",
    "clip_tokenizer",
    "cross_attention_layers",
    "generation_defaults",
    "load_pipeline",
    "make_scheduler",
    "set_threads",
]

class _QuietImageProcessorFallback(logging.Filter):
    """Drops transformers' notice that an image processor falls back to PIL without torchvision.

    diffusers' pipeline classes name CLIP/SigLIP image processors, which opendaam never runs; the notice (three
    lines on every command) is about a dependency we deliberately do not install.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """False for the fallback notice, True for everything else."""
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_QuietImageProcessorFallback())

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_DIR = ASSETS / "clip_tokenizer"
BUNDLED_MODELS = {"toy-urban": ASSETS / "toy-urban"}
"""Short names of the models that ship inside the package, and their folders."""


def set_threads(n: int | None) -> None:
    """Set torch's intra-op thread count (two threads beside another job ran ~10x slower than one).

    Examples:
        >>> set_threads(1); torch.get_num_threads()
        1
    """
    if n is not None:
        torch.set_num_threads(int(n))


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """Stable Diffusion's CLIP tokenizer, built offline from the files shipped with opendaam.

    Args:
        pad_token: ``"<|endoftext|>"`` as in Stable Diffusion 1.x, ``"!"`` as in 2.x.

    Examples:
        >>> tok = clip_tokenizer()
        >>> tok("a photo of a cat").input_ids
        [49406, 320, 1125, 539, 320, 2368, 49407]
    """
    from transformers import CLIPTokenizer

    return CLIPTokenizer(
        str(TOKENIZER_DIR / "vocab.json"),
        str(TOKENIZER_DIR / "merges.txt"),
        pad_token=pad_token,
        model_max_length=77,
    )


SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "lms": "LMSDiscreteScheduler",
    "unipc": "UniPCMultistepScheduler",
}
"""Short scheduler names accepted by :func:`load_pipeline` and the CLI."""


def make_scheduler(name: str, config):
    """A diffusers scheduler of the short ``name`` built from another scheduler's ``config``.

    Examples:
        >>> from diffusers import PNDMScheduler
        >>> type(make_scheduler("ddim", PNDMScheduler().config)).__name__
        'DDIMScheduler'
    """
    import diffusers

    key = name.lower()
    if key not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[key]).from_config(config)


@dataclass(frozen=True)
class Architecture:
    """Sizes of a Stable-Diffusion-shaped pipeline built with random weights."""

    unet: dict  # UNet2DConditionModel config: the layers whose attention opendaam reads
    vae: dict  # AutoencoderKL config: fixes the latent-to-image scale factor
    text: dict  # CLIPTextConfig: fixes the text width the keys are computed from
    pad_token: str = "<|endoftext|>"  # SD 1.x pads with the end token, SD 2.x with "!"
    scheduler: str = "pndm"  # Stable Diffusion's default scheduler


_SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
)
_SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)
_SD_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)

ARCHITECTURES: dict[str, Architecture] = {
    # Test-sized: diffusers' own tests use UNets this small; cross-attention at both levels.
    "tiny": Architecture(
        unet=dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(4, 8),
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            norm_num_groups=2, cross_attention_dim=32, attention_head_dim=2,
        ),
        vae=dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=2,
            block_out_channels=(4, 8), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
        ),
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407),
        scheduler="ddim",
    ),
    # The exact Stable Diffusion 2-base architecture (OpenCLIP ViT-H text encoder, linear projections).
    "sd2-base": Architecture(
        unet=dict(_SD_UNET, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                  use_linear_projection=True),
        vae=_SD_VAE,
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="gelu", projection_dim=512),
        pad_token="!",
    ),
    # Stable Diffusion 1.x (CLIP ViT-L/14 text encoder).
    "sd15": Architecture(
        unet=dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768),
        vae=_SD_VAE,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  max_position_embeddings=77, vocab_size=49408, hidden_act="quick_gelu", projection_dim=768),
    ),
}
"""Offline architectures for :func:`build_pipeline`: ``tiny`` for tests, exact SD shapes for benchmarks."""


def build_pipeline(
    architecture: str | Architecture = "tiny",
    *,
    seed: int = 0,
    img2img: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """A Stable Diffusion pipeline with random weights, built from configs without any download.

    Args:
        architecture: a key of :data:`ARCHITECTURES` or an :class:`Architecture`.
        seed: seeds the random weights, so two builds are identical.
        img2img: build ``StableDiffusionImg2ImgPipeline`` instead of the text-to-image one.
        dtype: weights' dtype.

    Examples:
        >>> pipe = build_pipeline("tiny")
        >>> type(pipe).__name__, list(pipe.unet.config.block_out_channels)
        ('StableDiffusionPipeline', [4, 8])
    """
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if isinstance(architecture, str):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")
        architecture = ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**architecture.unet)
    vae = AutoencoderKL(**architecture.vae)
    text_encoder = CLIPTextModel(CLIPTextConfig(**architecture.text))
    sd_config = {**PNDMScheduler(**_SD_SCHEDULER).config, "clip_sample": False}
    scheduler = make_scheduler(architecture.scheduler, sd_config)
    parts = dict(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(architecture.pad_token),
        scheduler=scheduler,
    )
    pipe = _stable_diffusion_class(img2img)(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


def _stable_diffusion_class(img2img: bool):
    """The diffusers Stable Diffusion pipeline class for text-to-image or image-to-image."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    return StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline


def load_pipeline(
    name_or_path: str | Path = "toy-urban",
    *,
    img2img: bool = False,
    scheduler: str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
    **kwargs,
):
    """Load a diffusers pipeline through ``from_pretrained``: a hub id, a local folder or a bundled name.

    Args:
        name_or_path: a Hugging Face hub id (``"stabilityai/stable-diffusion-2-base"``), a folder
            written by ``save_pretrained``, or the short name of a bundled model (``"toy-urban"``).
        img2img: return the image-to-image variant of the same pipeline (shares the weights).
        scheduler: a short name from :data:`SCHEDULERS` to replace the pipeline's scheduler.
        dtype: ``torch_dtype`` passed to ``from_pretrained``.
        revision: hub revision (branch, tag or commit).
        device: where to move the pipeline.
        **kwargs: passed on to ``from_pretrained``.

    Examples:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> build_pipeline("tiny").save_pretrained(folder)
        >>> type(load_pipeline(folder, scheduler="euler").scheduler).__name__
        'EulerDiscreteScheduler'
    """
    from diffusers import AutoPipelineForImage2Image, DiffusionPipeline

    source = str(name_or_path)
    if source in BUNDLED_MODELS:
        folder = BUNDLED_MODELS[source]
        if not (folder / "model_index.json").exists():
            raise FileNotFoundError(
                f"the bundled model {source!r} is not installed at {folder}; reinstall opendaam from a "
                "clone that has the folder src/opendaam/assets/toy-urban"
            )
        source = str(folder)
    if Path(source).exists() and not (Path(source) / "model_index.json").exists():
        raise FileNotFoundError(
            f"{source} is not a diffusers pipeline folder (no model_index.json); write one with "
            "pipe.save_pretrained(folder)"
        )
    if Path(source).exists():
        check_denoiser(json.loads((Path(source) / "model_index.json").read_text()), source)
    options = dict(kwargs)
    if dtype is not None:
        options["torch_dtype"] = dtype
    if revision is not None:
        options["revision"] = revision
    pipe = DiffusionPipeline.from_pretrained(source, **options)
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # attribution maps need the raw image
    if img2img:
        pipe = AutoPipelineForImage2Image.from_pipe(pipe)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


DENOISERS: dict[str, str] = {
    "UNet2DConditionModel": "U-Net cross-attention (Stable Diffusion 1/2, SDXL)",
    "PixArtTransformer2DModel": "DiT cross-attention (PixArt-alpha, PixArt-Sigma)",
    "SD3Transformer2DModel": "joint attention (Stable Diffusion 3, 3.5)",
    "FluxTransformer2DModel": "joint attention with single-stream blocks (Flux)",
}
"""Denoiser classes opendaam traces, with the attention family each belongs to."""


def check_denoiser(model_index: dict, source: str = "the pipeline") -> str:
    """The attention family of a pipeline from its ``model_index.json`` (read before any weight is loaded).

    Raises:
        ValueError: the denoiser is of no supported family; the message names them.

    Examples:
        >>> check_denoiser({"transformer": ["diffusers", "FluxTransformer2DModel"]})
        'joint attention with single-stream blocks (Flux)'
    """
    for part in ("unet", "transformer"):
        entry = model_index.get(part)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            if entry[1] in DENOISERS:
                return DENOISERS[entry[1]]
            raise ValueError(f"{source}: opendaam cannot trace a {entry[1]} denoiser; supported: "
                             + "; ".join(f"{family} ({cls})" for cls, family in DENOISERS.items()))
    raise ValueError(f"{source} has no unet or transformer to trace; supported: " + "; ".join(DENOISERS.values()))


def cross_attention_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """The cross-attention modules of a denoiser, keyed by their ``attn_processors`` name.

    Raises:
        ValueError: the model has no cross-attention layer to read.

    Examples:
        >>> unet = build_pipeline("tiny").unet
        >>> list(cross_attention_layers(unet))[0]
        'down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor'
    """
    processors = getattr(unet, "attn_processors", None) or {}
    found = {}
    for name, module in unet.named_modules():
        key = f"{name}.processor"
        if key in processors and getattr(module, "is_cross_attention", False):
            found[key] = module
    if not found:
        raise ValueError(
            f"{type(unet).__name__} has no cross-attention layer (no attention module with "
            "is_cross_attention=True); opendaam needs a text-conditioned denoiser such as "
            "UNet2DConditionModel"
        )
    return found


def generation_defaults(pipe, **overrides) -> dict:
    """Steps, guidance and size a pipeline generates with when not told otherwise.

    A model folder may carry ``opendaam.json`` with its own (the bundled toy-urban does); otherwise the
    pipeline's own defaults (Stable Diffusion: 50 steps, guidance 7.5; SD3: 28 and 7.0; Flux: 28 and 3.5) and
    its default size. Keyword
    ``overrides`` that are not None (``num_inference_steps=``, ``guidance_scale=``, ``height=``, ``width=``)
    replace them.

    Examples:
        >>> generation_defaults(build_pipeline("tiny"))
        {'num_inference_steps': 50, 'guidance_scale': 7.5, 'height': 16, 'width': 16}
        >>> generation_defaults(build_pipeline("tiny"), num_inference_steps=2, height=None)["num_inference_steps"]
        2
    """
    import inspect
    import json

    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    latent = getattr(pipe, "default_sample_size", None) or denoiser.config.get("sample_size", 64)
    size = int(latent) * int(getattr(pipe, "vae_scale_factor", 8))
    own = inspect.signature(pipe.__call__).parameters  # the pipeline's own defaults (SD3: 28 steps, 7.0)
    defaults = {"num_inference_steps": own["num_inference_steps"].default if "num_inference_steps" in own else 50,
                "guidance_scale": own["guidance_scale"].default if "guidance_scale" in own else 7.5,
                "height": size, "width": size}
    folder = getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path")
    if folder and (Path(folder) / "opendaam.json").exists():
        own = json.loads((Path(folder) / "opendaam.json").read_text())
        defaults.update({k: v for k, v in own.items() if k in defaults})
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}; valid: {', '.join(defaults)}")
    defaults.update({k: v for k, v in overrides.items() if v is not None})
    return defaults
