"""The attention maths, in one place: text keys, image queries, softmax over text tokens, map resizing.

Tracing (while the pipeline runs), heatmaps (after it) and token optimization (in a loop) all compute the
same quantities from a diffusers ``Attention`` module; they call these functions so that a key means the
same thing everywhere. First layer of opendaam: imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOG2E",
    "UPSAMPLE_MODES",
    "query_heads",
    "key_linear",
    "key_weight",
    "scores_bounded",
    "softmax_maps",
    "text_keys",
    "token_softmax_",
    "upsample",
]

LOG2E = 1.0 / math.log(2)
"""Scores multiplied by log2(e) give the same softmax through ``exp2``, about 3x cheaper than ``exp`` on CPU."""

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")
"""Interpolations from a layer's feature map to latent size (all linear, so sums commute with them)."""

EXP2_SAFE = 62.0
"""Largest score (log2 units) for which softmax needs no max subtraction: 2^62 cannot overflow float32 and
the largest term of a sum stays above 2^-62, far from underflow."""


def key_linear(attn) -> bool:
    """Whether the layer's keys are a linear function of the text (no ``norm_cross``, no ``norm_k``).

    Examples:
        >>> from diffusers.models.attention_processor import Attention
        >>> key_linear(Attention(8, cross_attention_dim=4, heads=2, dim_head=4))
        True
    """
    return not attn.norm_cross and attn.norm_k is None


def key_weight(attn) -> tuple[Tensor, Tensor | None]:
    """``W_k`` ``(inner, text_dim)`` and its bias ``(inner,)`` (or None) as detached float32 tensors."""
    weight = attn.to_k.weight.detach().float()
    bias = attn.to_k.bias.detach().float() if attn.to_k.bias is not None else None
    return weight, bias


def text_keys(attn, states: Tensor, *, exact_module: bool = False) -> Tensor:
    """Keys of text ``states`` ``(..., T, text_dim)`` in one layer, ``(..., heads, T, head_dim)``.

    The layer's own steps: ``norm_cross`` on the text, ``to_k``, the split into heads, ``norm_k``.

    Args:
        attn: a diffusers ``Attention`` module.
        states: text states; the result is differentiable in them.
        exact_module: run ``to_k`` itself in the model's dtype, exactly as the layer does while the pipeline
            generates (tracing); by default the product is taken in float32 with detached weights (maps and
            optimization of new text).

    Examples:
        >>> from diffusers.models.attention_processor import Attention
        >>> attn = Attention(8, cross_attention_dim=4, heads=2, dim_head=4)
        >>> text_keys(attn, torch.zeros(77, 4)).shape
        torch.Size([2, 77, 4])
    """
    if exact_module:
        x = attn.norm_encoder_hidden_states(states) if attn.norm_cross else states
        key = attn.to_k(x)  # (..., T, inner)
    else:
        x = states.float()
        if attn.norm_cross:
            x = attn.norm_encoder_hidden_states(x[None].to(attn.to_k.weight.dtype)).float()[0]
        weight, bias = key_weight(attn)
        key = F.linear(x, weight, bias)  # (..., T, inner)
    heads = attn.heads
    k = key.view(*key.shape[:-1], heads, key.shape[-1] // heads).transpose(-2, -3)  # (..., heads, T, head_dim)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k


def query_heads(attn, flat: Tensor) -> Tensor:
    """Per-head queries ``(..., heads, N, head_dim)`` after ``norm_q`` from ``to_q``'s output ``flat``
    ``(..., N, inner)`` (a view of it when the layer has no query norm).

    Examples:
        >>> from diffusers.models.attention_processor import Attention
        >>> attn = Attention(8, cross_attention_dim=4, heads=2, dim_head=4)
        >>> tuple(query_heads(attn, attn.to_q(torch.zeros(3, 16, 8))).shape)
        (3, 2, 16, 4)
    """
    heads = attn.heads
    q = flat.view(*flat.shape[:-1], heads, flat.shape[-1] // heads).transpose(-2, -3)  # (..., heads, N, hd)
    return attn.norm_q(q) if attn.norm_q is not None else q


def scores_bounded(q: Tensor, keys: Tensor) -> bool:
    """Whether every score ``q . k`` is within +-:data:`EXP2_SAFE` by Cauchy-Schwarz (CPU only: on an
    accelerator the check would wait for the device, so the max is always subtracted there)."""
    if q.device.type != "cpu":
        return False
    bound = q.norm(dim=-1).amax() * keys.norm(dim=-1).amax()  # >= max |score| over pixels and tokens
    return bool(bound < EXP2_SAFE)


def token_softmax_(scores: Tensor, shift: bool = True) -> Tensor:
    """In place: softmax over the token axis (``-2``) of token-major scores in log2 units ``(..., T, N)``.

    Tokens before pixels, so max, exp2 and sum run along contiguous pixels. ``shift=False`` skips the max
    subtraction, safe only when :func:`scores_bounded` says so.

    Examples:
        >>> s = torch.tensor([[0.0], [1.0]])
        >>> token_softmax_(s.clone()).flatten().tolist()
        [0.3333333432674408, 0.6666666865348816]
    """
    if shift:
        scores -= scores.amax(dim=-2, keepdim=True)
    scores.exp2_()
    scores /= scores.sum(dim=-2, keepdim=True)
    return scores


def softmax_maps(keys: Tensor, q: Tensor, scale: float, bias: Tensor | None = None) -> Tensor:
    """Attention probabilities of queries ``(..., heads, N, head_dim)`` over keys ``(heads, T, head_dim)``,
    token-major ``(..., heads, T, N)`` (the softmax runs over a non-last axis, which PyTorch vectorizes along
    the pixels; a last axis of a few tokens is slow). ``bias`` ``(T,)`` is added to the scores (a padding mask).
    Differentiable in both.

    Examples:
        >>> softmax_maps(torch.zeros(1, 3, 4), torch.zeros(2, 1, 5, 4), 0.5).sum(-2).unique().tolist()
        [1.0]
        >>> softmax_maps(torch.zeros(1, 2, 4), torch.zeros(1, 3, 4), 1.0, torch.tensor([0.0, -1e4]))[0, :, 0].tolist()
        [1.0, 0.0]
    """
    scores = torch.matmul(keys, q.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias[:, None]
    return scores.softmax(-2)


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Resize ``(..., h, w)`` maps to ``size`` with a linear interpolation (no clamping, so it stays linear).

    Examples:
        >>> upsample(torch.ones(2, 4, 4), (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])  # (1, channels, h, w)
    options = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **options)
    return out.reshape(*lead, *size)
