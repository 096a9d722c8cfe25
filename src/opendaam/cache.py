"""Reading the cache a trace recorded: loading records, choosing layers, steps and heads, query tensors.

Third layer of opendaam: imports :mod:`opendaam.tracing` (the :class:`~opendaam.tracing.Record` type)
and nothing later.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from opendaam.tracing import LayerInfo, Record
from opendaam.tracing.tracer import expand_layers

__all__ = [
    "load_record",
    "query_cache_bytes",
    "queries",
    "select_heads",
    "select_layers",
    "select_steps",
]


def load_record(path: str | Path) -> Record:
    """Load a record written by :meth:`Record.save <opendaam.tracing.Record.save>`.

    Examples:
        >>> import os, tempfile
        >>> path = Record(meta={"prompt": "a car"}).save(os.path.join(tempfile.mkdtemp(), "r.safetensors"))
        >>> load_record(path).meta["prompt"]
        'a car'
    """
    return Record.load(path)


def select_layers(record: Record, layers: str | Sequence[str] | None = None) -> list[str]:
    """Names of the recorded layers that equal or start with one of ``layers`` (all when None).

    A prefix picks a block: ``"up_blocks.1"``, ``"mid_block"``, ``"down_blocks.0.attentions.1"``.

    Raises:
        ValueError: a selector matches no recorded layer; the message lists the valid names.

    Examples:
        >>> from opendaam.tracing import LayerInfo
        >>> r = Record(layers={n: LayerInfo(n, 1, 1, 1.0, 1, 1) for n in ["down.a", "up.b"]})
        >>> select_layers(r, "up")
        ['up.b']
    """
    names = list(record.layers)
    if layers is None:
        return names
    return expand_layers(names, [layers] if isinstance(layers, str) else list(layers), "the record has these layers")


def select_steps(record: Record, steps: int | Sequence[int] | None) -> list[int] | None:
    """Positions (into the recorded steps) of the U-Net call indices ``steps``; None keeps them all.

    Raises:
        ValueError: a step was not recorded; the message lists the recorded ones.

    Examples:
        >>> select_steps(Record(meta={"steps": [0, 2, 4]}), [2, 4])
        [1, 2]
    """
    if steps is None:
        return None
    if isinstance(steps, int):
        steps = [steps]
    recorded = record.steps
    missing = [s for s in steps if s not in recorded]
    if missing:
        raise ValueError(f"steps {missing} were not recorded; recorded U-Net calls: {recorded}")
    return [recorded.index(s) for s in steps]


def select_heads(info: LayerInfo, heads: int | Sequence[int] | None) -> list[int] | None:
    """Head indices to keep in a layer, checked against its head count; None keeps all.

    Examples:
        >>> select_heads(LayerInfo("x", 4, 8, 0.35, 2, 2), [0, 3])
        [0, 3]
    """
    if heads is None:
        return None
    if isinstance(heads, int):
        heads = [heads]
    bad = [h for h in heads if not 0 <= h < info.heads]
    if bad:
        raise ValueError(f"heads {bad} do not exist in layer {info.name}, which has {info.heads} heads")
    return list(heads)


def queries(record: Record, layer: str, positions: list[int] | None = None,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Cached queries of one layer as a contiguous ``(steps, heads, N, head_dim)``, dequantized to ``dtype``.

    Raises:
        ValueError: the record has no query cache (trace with ``queries=True``).
    """
    if layer not in record.queries:
        raise ValueError(
            "this record has no query cache for open-vocabulary or per-step maps; trace with "
            "opendaam.trace(pipe, queries=True)"
        )
    stored = record.queries[layer]  # (S, heads, N, head_dim)
    index = _as_slice(positions)
    if index is not None:
        stored = stored[index]
    q = stored.to(dtype)
    if layer in record.query_scales:
        scales = record.query_scales[layer]  # (S, heads, N)
        if index is not None:
            scales = scales[index]
        q = q * scales.to(dtype).unsqueeze(-1)
    return q


def _as_slice(positions: list[int] | None) -> slice | list[int] | None:
    """A slice for consecutive positions (a view, no copy), else the list itself."""
    if positions is None or not positions:
        return positions or None
    if list(positions) == list(range(positions[0], positions[-1] + 1)):
        return slice(positions[0], positions[-1] + 1)
    return list(positions)


def query_cache_bytes(unet_config, height: int, width: int, calls: int, bytes_per_value: float = 2.0,
                      vae_scale_factor: int = 8) -> int:
    """Bytes of a query cache for one image, computed from a U-Net config's shapes (no generation).

    Each cross-attention layer at level ``i`` (latent halved ``i`` times) stores ``calls x N_i x C_i``
    values, ``C_i`` being the block's channels.

    Examples:
        >>> from opendaam.models import ARCHITECTURES
        >>> cfg = ARCHITECTURES["sd2-base"].unet
        >>> round(query_cache_bytes(cfg, 512, 512, calls=31) / 1e9, 3)
        0.716
    """
    cfg = dict(unet_config)
    channels = list(cfg["block_out_channels"])
    levels = len(channels)

    def per_level(key, default):  # an int for every level, or one value per level (SDXL: [1, 2, 10])
        value = cfg.get(key, default)
        return [value] * levels if isinstance(value, int) else list(value)

    per_block = per_level("layers_per_block", 2)
    tpb = per_level("transformer_layers_per_block", 1)
    up_tpb = cfg.get("reverse_transformer_layers_per_block") or tpb[::-1]  # up blocks, in their own order
    h, w = height // vae_scale_factor, width // vae_scale_factor
    total = 0
    sizes = []
    for _ in channels:
        sizes.append(h * w)
        h, w = -(-h // 2), -(-w // 2)
    for i, kind in enumerate(cfg["down_block_types"]):
        if "CrossAttn" in kind:
            total += per_block[i] * tpb[i] * sizes[i] * channels[i]
    for i, kind in enumerate(cfg["up_block_types"]):
        level = levels - 1 - i
        if "CrossAttn" in kind:
            total += (per_block[level] + 1) * up_tpb[i] * sizes[level] * channels[level]
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid and "CrossAttn" in mid:
        total += tpb[-1] * sizes[-1] * channels[-1]
    return int(total * calls * bytes_per_value)
