"""Pictures for people: overlay grids of maps over images. Last layer of opendaam (beside the CLI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opendaam.heatmaps import Heatmaps

__all__ = ["overlay_grid", "to_pil"]


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
