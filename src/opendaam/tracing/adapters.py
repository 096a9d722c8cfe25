"""Architecture adapters: where a denoiser's text-conditioned attention layers are, and what they read.

One small class per attention family says how to find the layers (by module type and configuration, never by
a name such as ``attn2``) and how to get, for one layer, the image queries' input and the text states exactly
as the layer's processor computes them. The tracer, heatmaps and optimization ask :func:`adapter_for` and never
look inside a denoiser themselves.
"""

from __future__ import annotations

from torch import Tensor, nn

from opendaam.models import cross_attention_layers

__all__ = ["ADAPTERS", "Adapter", "UNetCrossAttention", "adapter_for"]


class Adapter:
    """The interface of an architecture adapter (one per attention family)."""

    family: str = ""
    """Human-readable name of the family, used in error messages."""

    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether ``pipe``'s denoiser belongs to this family."""
        raise NotImplementedError

    @staticmethod
    def denoiser(pipe) -> nn.Module:
        """The module the pipeline calls once per step with the noisy latent."""
        raise NotImplementedError

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        """The text-conditioned attention modules, keyed by their ``attn_processors`` name, in model order."""
        raise NotImplementedError

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        """Width of the text states the keys are computed from."""
        raise NotImplementedError

    @staticmethod
    def sample(args: tuple, kwargs: dict) -> tuple[Tensor, object]:
        """The noisy latent and the timestep from the denoiser's call arguments."""
        raise NotImplementedError

    @staticmethod
    def query_input(attn: nn.Module, hidden_states: Tensor, temb: Tensor | None) -> Tensor:
        """The layer's query input ``(n, N, dim)`` from the rows of its ``hidden_states`` (norms included)."""
        raise NotImplementedError


class UNetCrossAttention(Adapter):
    """U-Net cross-attention (Stable Diffusion 1 and 2, SDXL): ``Attention`` modules with
    ``is_cross_attention``; queries from the image, keys from the text states passed as
    ``encoder_hidden_states``."""

    family = "U-Net cross-attention (Stable Diffusion 1/2, SDXL)"

    @classmethod
    def matches(cls, pipe) -> bool:
        return isinstance(getattr(pipe, "unet", None), nn.Module)

    @staticmethod
    def denoiser(pipe) -> nn.Module:
        return pipe.unet

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        return cross_attention_layers(denoiser)

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        return int(denoiser.config.cross_attention_dim)

    @staticmethod
    def sample(args: tuple, kwargs: dict) -> tuple[Tensor, object]:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return sample, timestep

    @staticmethod
    def query_input(attn: nn.Module, hidden_states: Tensor, temb: Tensor | None) -> Tensor:
        h = hidden_states
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb)
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)  # (n, N, dim)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        return h


ADAPTERS: tuple[type[Adapter], ...] = (UNetCrossAttention,)
"""The supported attention families, tried in order."""


def adapter_for(pipe) -> type[Adapter]:
    """The adapter of ``pipe``'s denoiser.

    Raises:
        ValueError: the pipeline belongs to no supported family; the message names them.

    Example:
        >>> from opendaam.models import build_pipeline
        >>> adapter_for(build_pipeline("tiny")).family
        'U-Net cross-attention (Stable Diffusion 1/2, SDXL)'
    """
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    has = [n for n in ("unet", "transformer") if getattr(pipe, n, None) is not None]
    found = f"its denoiser is {type(getattr(pipe, has[0])).__name__}" if has else "it has no unet or transformer"
    raise ValueError(
        f"opendaam cannot trace {type(pipe).__name__}: {found}. Supported families: "
        + "; ".join(a.family for a in ADAPTERS)
    )
