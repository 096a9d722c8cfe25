"""Pictures for people: overlay grids of maps over images. Last layer of opendaam (beside the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opendaam.heatmaps import Heatmaps

__all__ = ["overlay_grid", "plot_ablation", "plot_curves", "to_pil"]


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image or an ``(H, W, 3)`` array in [0, 1] or uint8.

    Example:
        >>> to_pil(np.zeros((4, 6, 3))).size
        (6, 4)
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def overlay_grid(image, rows: Sequence[tuple[str, Heatmaps]], cell: int = 128) -> Image.Image:
    """A grid: the image first, then one overlay per label; one row per (title, heatmaps) pair.

    Example:
        >>> import torch
        >>> maps = Heatmaps(torch.rand(2, 4, 4), ["car", "tree"], image_size=(8, 8))
        >>> overlay_grid(np.zeros((8, 8, 3)), [("daam", maps)], cell=32).size
        (96, 46)
    """
    base = to_pil(image)
    columns = 1 + max(len(m.labels) for _, m in rows)
    header = 14
    grid = Image.new("RGB", (columns * cell, len(rows) * (cell + header)), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for r, (title, maps) in enumerate(rows):
        top = r * (cell + header)
        draw.text((2, top + 1), title, fill="black", font=font)
        grid.paste(base.resize((cell, cell), Image.NEAREST), (0, top + header))
        for c, label in enumerate(maps.labels, start=1):
            draw.text((c * cell + 2, top + 1), label[:18], fill="black", font=font)
            tile = maps.overlay(base, c - 1).resize((cell, cell), Image.NEAREST)
            grid.paste(tile, (c * cell, top + header))
    return grid


def plot_curves(summary: dict, path, methods: Sequence[str] | None = None) -> None:
    """mIoU-vs-threshold curves per class with 5th-95th percentile bands (the thesis' figures 4.3/4.5/4.8).

    Args:
        summary: a summary with ``"thresholds"`` and ``"methods"`` as written by the experiment/evaluation.
        path: PNG file to write.
        methods: which methods to draw (default: all).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = summary["thresholds"]
    chosen = list(methods or summary["methods"])
    classes = [c for c in summary["methods"][chosen[0]] if c != "all"]
    fig, axes = plt.subplots(1, len(classes), figsize=(4 * len(classes), 3.4), squeeze=False)
    for ax, cls in zip(axes[0], classes, strict=True):
        for method in chosen:
            row = summary["methods"][method][cls]
            line = ax.plot(taus, row["curve"], label=method)[0]
            band = np.asarray(row["band"])
            ax.fill_between(taus, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.12)
        ax.set_title(cls)
        ax.set_xlabel("threshold tau")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU (x100)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(result: dict, path) -> None:
    """The block x step max-mIoU matrix of :func:`opendaam.experiments.ablation` as a heatmap figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(result["miou"])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * matrix.shape[1] + 2), 0.45 * matrix.shape[0] + 1.5))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(1.0, float(matrix.max())))
    ax.set_yticks(range(len(result["blocks"])), result["blocks"])
    ax.set_xticks(range(len(result["steps"])), result["steps"], fontsize=6)
    ax.set_xlabel("U-Net call (step)")
    fig.colorbar(image, ax=ax, label="max mIoU (x100)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
