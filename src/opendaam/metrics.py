"""Segmentation metrics as pure functions on confusion counts, and threshold curves.

``confusion(pred, target)`` gives ``(..., 4)`` counts (tp, fp, fn, tn) per image; every score is a function
of such counts, so per-image, per-class and dataset-level numbers come from one tensor. A threshold curve is
a stack of confusion counts over thresholds: ``(thresholds, images, 4)``.

Sixth layer of opendaam: imports nothing from opendaam (pure tensor functions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "auc",
    "binarize",
    "class_confusion",
    "confusion",
    "curve_summary",
    "default_thresholds",
    "iou_score",
    "mean_iou",
    "normalize_maps",
    "percentile_band",
    "threshold_curve",
]


def confusion(pred: Tensor, target: Tensor) -> Tensor:
    """Confusion counts of boolean masks over their last two dims: ``(..., 4)`` as (tp, fp, fn, tn).

    Raises:
        ValueError: shapes differ; the message gives both.

    Examples:
        >>> p = torch.tensor([[True, True], [False, False]])
        >>> t = torch.tensor([[True, False], [True, False]])
        >>> confusion(p, t).tolist()
        [1, 1, 1, 1]
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and mask {tuple(target.shape)} differ in size")
    p, t = pred.bool(), target.bool()
    tp = (p & t).sum((-2, -1))
    fp = (p & ~t).sum((-2, -1))
    fn = (~p & t).sum((-2, -1))
    tn = (~p & ~t).sum((-2, -1))
    return torch.stack([tp, fp, fn, tn], dim=-1)


def class_confusion(pred: Tensor, target: Tensor, classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion counts of label maps per class: ``(classes, 4)`` as (tp, fp, fn, tn), summed over all pixels
    whose target is not ``ignore_index`` (semantic segmentation's dataset-level counts).

    Args:
        pred: predicted label ids, any shape.
        target: true label ids, the same shape; ``ignore_index`` pixels are left out.
        classes: number of label ids ``0 .. classes - 1``.
        ignore_index: target value of pixels that are not scored.

    Raises:
        ValueError: shapes differ, or a label id is out of range; the message gives them.

    Examples:
        >>> p = torch.tensor([[0, 1], [1, 1]])
        >>> t = torch.tensor([[0, 1], [0, 255]])
        >>> class_confusion(p, t, 2).tolist()
        [[1, 0, 1, 1], [1, 1, 0, 1]]
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and labels {tuple(target.shape)} differ in size")
    keep = target != ignore_index
    p, t = pred[keep].long(), target[keep].long()  # (pixels,)
    for name, ids in (("prediction", p), ("labels", t)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= classes):
            raise ValueError(f"{name} hold ids {int(ids.min())}..{int(ids.max())}, outside 0..{classes - 1}")
    matrix = torch.bincount(t * classes + p, minlength=classes * classes).reshape(classes, classes)  # (true, pred)
    tp = matrix.diagonal()
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    tn = matrix.sum() - tp - fp - fn
    return torch.stack([tp, fp, fn, tn], dim=-1)


def iou_score(stats: Tensor, empty: float = float("nan")) -> Tensor:
    """IoU ``tp / (tp + fp + fn)`` of confusion counts ``(..., 4)``; ``empty`` where the union is empty.

    Examples:
        >>> iou_score(torch.tensor([[1, 1, 1, 1], [0, 0, 0, 4]])).tolist()
        [0.3333333432674408, nan]
    """
    tp, fp, fn = stats[..., 0].float(), stats[..., 1].float(), stats[..., 2].float()
    union = tp + fp + fn
    return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(union, empty))


def mean_iou(stats: Tensor, reduction: str = "per_image") -> Tensor:
    """Mean IoU over the image axis (second to last) of ``(..., images, 4)`` counts.

    ``"per_image"``: the mean of per-image IoUs (the thesis' curves); ``"dataset"``: summed intersections
    over summed unions (OVAM's). Images with an empty union are left out of ``"per_image"``.

    Examples:
        >>> s = torch.tensor([[1, 0, 0, 3], [1, 3, 0, 0]])
        >>> mean_iou(s).item(), mean_iou(s, "dataset").item()
        (0.625, 0.4000000059604645)
    """
    if reduction == "per_image":
        return iou_score(stats).nanmean(dim=-1)
    if reduction == "dataset":
        return iou_score(stats.sum(-2))
    raise ValueError(f"reduction must be 'per_image' or 'dataset', not {reduction!r}")


def normalize_maps(maps: Tensor, kind: str = "max", *, dims: int = 2, eps: float = 1e-12) -> Tensor:
    """Scale maps to [0, 1] per map: divide by the max (eq. 3.4) or min-max.

    Args:
        maps: ``(..., H, W)`` maps, or ``(..., P)`` flat ones with ``dims=1``.
        kind: ``"max"`` or ``"minmax"``.
        dims: how many trailing dimensions make one map.
        eps: the smallest divisor (a flat map stays finite).

    Examples:
        >>> normalize_maps(torch.tensor([[[1.0, 3.0]]]), "minmax").tolist()
        [[[0.0, 1.0]]]
        >>> normalize_maps(torch.tensor([[1.0, 3.0]]), "minmax", dims=1).tolist()
        [[0.0, 1.0]]
    """
    if kind not in ("max", "minmax"):
        raise ValueError(f"normalization must be 'max' or 'minmax', not {kind!r}")
    flat = maps.flatten(-dims) if dims > 1 else maps
    pad = (None,) * dims
    high = flat.amax(-1)[(..., *pad)]
    if kind == "max":
        return maps / high.clamp_min(eps)
    low = flat.amin(-1)[(..., *pad)]
    return (maps - low) / (high - low).clamp_min(eps)


def binarize(maps: Tensor, tau: float, kind: str = "max") -> Tensor:
    """Masks ``normalized(maps) >= tau`` (``map >= tau * max`` for ``kind="max"``, thesis eq. 3.4)."""
    return normalize_maps(maps, kind) >= tau


def default_thresholds(step: float = 0.05) -> Tensor:
    """Thresholds from 0 to 1 inclusive in steps of ``step``.

    Examples:
        >>> default_thresholds(0.25).tolist()
        [0.0, 0.25, 0.5, 0.75, 1.0]
    """
    n = int(round(1.0 / step))
    return torch.linspace(0.0, 1.0, n + 1)


def threshold_curve(maps: Tensor, targets: Tensor, thresholds: Tensor | Sequence[float] | None = None,
                    kind: str = "max") -> Tensor:
    """Confusion counts at every threshold: ``(thresholds, images, 4)`` for ``(images, H, W)`` maps and masks.

    Examples:
        >>> maps = torch.tensor([[[0.2, 1.0], [0.6, 0.0]]])
        >>> target = torch.tensor([[[False, True], [True, False]]])
        >>> iou_score(threshold_curve(maps, target, [0.5, 0.8]))[:, 0].tolist()
        [1.0, 0.5]
    """
    taus = torch.as_tensor(default_thresholds() if thresholds is None else thresholds, dtype=torch.float32)
    if maps.shape != targets.shape:
        raise ValueError(f"maps {tuple(maps.shape)} and masks {tuple(targets.shape)} differ in size")
    norm = normalize_maps(maps.float(), kind)
    return torch.stack([confusion(norm >= tau, targets) for tau in taus.tolist()])


def auc(values: Tensor, thresholds: Tensor) -> Tensor:
    """Area under a curve sampled at ``thresholds`` (trapezoid rule), over the last axis.

    Examples:
        >>> auc(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0.0, 0.5, 1.0])).item()
        1.0
    """
    return torch.trapezoid(values, thresholds.to(values.dtype), dim=-1)


def percentile_band(values: Tensor, low: float = 5.0, high: float = 95.0) -> Tensor:
    """Percentiles of per-image values ``(thresholds, images)`` over images: ``(thresholds, 2)``.

    Examples:
        >>> percentile_band(torch.arange(101.0)[None]).tolist()
        [[5.0, 95.0]]
    """
    q = torch.tensor([low / 100.0, high / 100.0], dtype=values.dtype)
    return torch.nanquantile(values, q, dim=-1).T


def curve_summary(curve: Tensor, thresholds: Tensor, reduction: str = "per_image") -> dict[str, float]:
    """Max mIoU, the threshold where it is reached, and the AUC of one class's ``(thresholds, images, 4)`` curve.

    Examples:
        >>> curve = torch.tensor([[[1, 1, 0, 2]], [[1, 0, 0, 3]]])
        >>> curve_summary(curve, torch.tensor([0.0, 1.0]))
        {'max_miou': 1.0, 'best_tau': 1.0, 'auc': 0.75}
    """
    miou = mean_iou(curve, reduction)  # (thresholds,)
    best = int(torch.nan_to_num(miou, nan=-1.0).argmax())
    return {"max_miou": float(miou[best]), "best_tau": float(thresholds[best]),
            "auc": float(auc(torch.nan_to_num(miou, nan=0.0), thresholds))}
