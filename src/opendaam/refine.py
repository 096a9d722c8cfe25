"""Label refinement: propagate word maps through the generation's own self-attention.

A self-attention layer says, for every pixel, which pixels it attends to; Dataset Diffusion and iSeg refine a
word's cross-attention map by letting each pixel collect the map over those pixels, ``m' = A^p m`` with ``A`` the
head-averaged affinities (rows sum to 1), which fills objects and sharpens their borders. The affinities are
recorded by ``trace(pipe, self_attention=(layers...))`` (``N^2`` floats per layer and image: 4 MB at 32 x 32).
After :mod:`opendaam.heatmaps`: imports it and earlier layers only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from opendaam.attention import upsample
from opendaam.heatmaps import Heatmaps
from opendaam.tracing import Record
from opendaam.tracing.tracer import expand_layers

__all__ = ["affinity", "refine"]


def affinity(record: Record, layers: str | Sequence[str] | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The row-stochastic affinity ``(N, N)`` (rows: query pixels) averaged over the chosen recorded
    self-attention layers and steps, and its grid ``(h, w)``.

    Raises:
        ValueError: the record has no self-attention, or the chosen layers have different grids.
    """
    if not record.self_attention:
        raise ValueError("this record has no self-attention affinities; trace with "
                         "opendaam.trace(pipe, self_attention=('up_blocks.1',)) or another layer selection")
    names = list(record.self_attention)
    if layers is not None:
        names = expand_layers(names, [layers] if isinstance(layers, str) else list(layers),
                              "the record has self-attention at")
    grids = {name: tuple(record.meta["self_attention_grids"][name]) for name in names}
    if len(set(grids.values())) > 1:
        raise ValueError(f"the chosen self-attention layers have different grids {sorted(set(grids.values()))}; "
                         "choose layers of one size with layers=")
    steps = max(1, len(record.steps))
    total = sum(record.self_attention[name].float() for name in names)  # (N, N), rows sum to layers x steps
    return total / (len(names) * steps), next(iter(grids.values()))


def refine(record: Record, maps: Heatmaps, power: int = 1, layers: str | Sequence[str] | None = None) -> Heatmaps:
    """Maps propagated ``power`` times through the record's self-attention: ``m' = A^power m`` on the affinity's
    grid, then interpolated back to latent size.

    Args:
        record: the record the maps were computed from, traced with ``self_attention=...``.
        maps: :func:`~opendaam.heatmaps.heatmaps` of that record (any method).
        power: how many propagation steps (Dataset Diffusion uses a power of the affinity).
        layers: which recorded self-attention layers to average (one grid size); all by default.

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> from opendaam.tracing import trace
        >>> from opendaam.heatmaps import heatmaps
        >>> pipe = build_pipeline("tiny")
        >>> with trace(pipe, self_attention=("up_blocks.1",)) as tracer:
        ...     _ = pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="np")
        >>> record = tracer.records[0]
        >>> refine(record, heatmaps(record, "car"), power=2).latent.shape
        torch.Size([1, 16, 16])
    """
    if power < 1:
        raise ValueError(f"power must be a positive number of propagation steps, not {power}")
    a, (gh, gw) = affinity(record, layers)
    latent = maps.latent  # (labels, h, w)
    h, w = latent.shape[-2:]
    grid = latent if (h, w) == (gh, gw) else F.adaptive_avg_pool2d(latent[None], (gh, gw))[0] if (
        gh <= h and gw <= w) else upsample(latent, (gh, gw), "bilinear")  # (labels, gh, gw)
    flat = grid.reshape(grid.shape[0], gh * gw)  # (labels, N)
    for _ in range(power):
        flat = flat @ a.T  # pixel p collects sum_q A[p, q] m[q]
    mode = record.meta.get("trace_config", {}).get("upsample", "bicubic")
    refined = upsample(flat.reshape(-1, gh, gw), (h, w), mode)  # (labels, h, w)
    return Heatmaps(latent=refined, labels=list(maps.labels), token_indices=list(maps.token_indices),
                    method=maps.method, image_size=maps.image_size, mode=maps.mode)
