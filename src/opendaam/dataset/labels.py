"""From per-class normalized maps to label maps, mask statistics and instances (connected components)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from opendaam.dataset.cityscapes import IGNORE

__all__ = ["BACKGROUND", "IGNORE", "adaptive_label_map", "connected_components", "label_map", "mask_stats",
           "otsu_threshold"]

BACKGROUND = 0
"""Label of pixels where no class map reaches the low threshold."""


def label_map(scores: np.ndarray, ids: Sequence[int], low: float, high: float) -> np.ndarray:
    """Label each pixel by its best class map: the class above ``high``, background below ``low``, else 255.

    Args:
        scores: ``(classes, H, W)`` normalized maps in [0, 1].
        ids: label id of each map (1..K; 0 is background, 255 ignore).
        low: below it (best map) a pixel is background.
        high: at or above it a pixel gets the best map's class; in between it is ignored (255).

    Returns:
        ``(H, W)`` uint8 label map. Ties go to the earlier map.

    Examples:
        >>> s = np.array([[[0.9, 0.4, 0.1]], [[0.2, 0.1, 0.0]]])
        >>> label_map(s, [1, 2], low=0.3, high=0.5).tolist()
        [[1, 255, 0]]
    """
    if scores.ndim != 3 or scores.shape[0] != len(ids):
        raise ValueError(f"scores must be (classes, H, W) with one id per class, got {scores.shape} and {len(ids)}")
    lut = np.asarray(ids, dtype=np.uint8)  # (classes,) map position -> label id
    best = scores.argmax(axis=0)  # (H, W) position of the strongest map
    peak = scores.max(axis=0)  # (H, W) its value
    labels = np.where(peak >= high, lut[best], np.uint8(IGNORE)).astype(np.uint8)  # (H, W)
    labels[peak < low] = BACKGROUND
    return labels


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """The threshold that best splits ``values`` in [0, 1] into two classes (Otsu: largest between-class
    variance of a histogram). Written here in a few numpy lines rather than taken from scikit-image, which would be
    a large dependency for this one function.

    Examples:
        >>> v = np.concatenate([np.full(50, 0.1), np.full(30, 0.8)])
        >>> 0.1 < otsu_threshold(v) <= 0.8
        True
    """
    counts, edges = np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight = counts.cumsum()  # pixels at or below each bin
    total = weight[-1]
    mass = (counts * centers).cumsum()
    below, above = weight[:-1], total - weight[:-1]
    valid = (below > 0) & (above > 0)
    if not valid.any():
        return float(centers[-1])
    mean_low = mass[:-1] / np.maximum(below, 1)
    mean_high = (mass[-1] - mass[:-1]) / np.maximum(above, 1)
    between = np.where(valid, below * above * (mean_low - mean_high) ** 2, -1.0)
    return float(edges[1:][:-1][between.argmax()])


def adaptive_label_map(scores: np.ndarray, ids: Sequence[int], margin: float = 0.1,
                       min_gap: float = 0.1) -> np.ndarray:
    """Label map with a threshold per image and class, and uncertain pixels ignored (255).

    Each class map gets its own Otsu threshold ``t``: a pixel is that class where its best map is at least
    ``t + margin (1 - t)``, background where every map is below its ``t (1 - margin)``, and 255 in between (the
    band is a share of the way from ``t`` to 1 and to 0, so it scales with the threshold), or where the best map
    leads the second by less than ``min_gap`` (two classes claim it).

    Args:
        scores: ``(classes, H, W)`` normalized maps in [0, 1].
        ids: label id of each map.
        margin: the uncertain band around each threshold, as a share of the way to 1 above and to 0 below.
        min_gap: smallest lead of the best map over the second for a confident label.

    Examples:
        >>> s = np.array([[[0.9, 0.85, 0.0, 0.0]], [[0.0, 0.8, 0.9, 0.0]]])  # two class maps, four pixels
        >>> adaptive_label_map(s, [1, 2]).tolist()  # the second pixel is claimed by both: ignored
        [[1, 255, 2, 0]]
    """
    if scores.ndim != 3 or scores.shape[0] != len(ids):
        raise ValueError(f"scores must be (classes, H, W) with one id per class, got {scores.shape} and {len(ids)}")
    thresholds = np.array([otsu_threshold(c.ravel()) for c in scores])[:, None, None]  # (classes, 1, 1)
    lut = np.asarray(ids, dtype=np.uint8)
    order = np.sort(scores, axis=0)
    best = scores.argmax(axis=0)  # (H, W)
    peak = order[-1]
    gap = peak - order[-2] if scores.shape[0] > 1 else np.ones_like(peak)
    high = thresholds + margin * (1 - thresholds)  # (classes, 1, 1)
    own = high[best, 0, 0]  # (H, W) the best class' upper bound
    confident = (peak >= own) & (gap >= min_gap)
    labels = np.full(peak.shape, IGNORE, dtype=np.uint8)
    labels[confident] = lut[best][confident]
    labels[(scores < thresholds * (1 - margin)).all(axis=0)] = BACKGROUND
    return labels


def mask_stats(labels: np.ndarray, scores: np.ndarray, ids: Sequence[int], names: Sequence[str]) -> list[dict]:
    """Per class: pixel count, area fraction and confidence (mean normalized score over its pixels).

    Examples:
        >>> labels = np.array([[1, 1, 0, 255]], dtype=np.uint8)
        >>> s = np.array([[[0.8, 0.6, 0.1, 0.4]]])
        >>> mask_stats(labels, s, [1], ["car"])
        [{'class': 'car', 'id': 1, 'pixels': 2, 'area': 0.5, 'confidence': 0.7, 'peak': 0.8}]
    """
    total = labels.size
    stats = []
    for i, (label_id, name) in enumerate(zip(ids, names, strict=True)):
        mask = labels == label_id  # (H, W) bool
        pixels = int(mask.sum())
        confidence = float(scores[i][mask].astype(np.float64).mean()) if pixels else 0.0
        stats.append({
            "class": name, "id": int(label_id), "pixels": pixels, "area": round(pixels / total, 6),
            "confidence": round(confidence, 6), "peak": round(float(scores[i].max()), 6),
        })
    return stats


def connected_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, int]:
    """Label the connected components of a boolean mask (``scipy.ndimage.label``).

    Args:
        mask: ``(H, W)`` bool.
        connectivity: 4 (edge neighbours) or 8 (edge and corner neighbours).

    Returns:
        ``(H, W)`` int32 component ids (0 outside the mask, 1..n in raster order of first pixel) and n.

    Raises:
        ImportError: scipy is missing (it comes with ``pip install 'opendaam[dataset]'``).

    Examples:
        >>> m = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]], dtype=bool)
        >>> connected_components(m, 8)[1], connected_components(m, 4)[1]
        (1, 3)
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, not {connectivity}")
    try:
        from scipy import ndimage
    except ImportError as error:
        raise ImportError("connected components need scipy: pip install 'opendaam[dataset]'") from error
    structure = ndimage.generate_binary_structure(2, 2 if connectivity == 8 else 1)  # (3, 3) neighbourhood
    out, count = ndimage.label(np.asarray(mask, dtype=bool), structure=structure)  # (H, W) ids in raster order
    return out.astype(np.int32), int(count)
