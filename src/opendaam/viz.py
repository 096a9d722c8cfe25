"""Pictures for people: map overlays and grids with a colour scale, curve figures, coloured label maps.

Grids and overlays are composed with Pillow so that a plain install (no matplotlib) draws the same picture:
images are upscaled smoothly (bicubic), maps are upsampled from their latent size with the record's own
interpolation, every row of a grid shares one colour scale with a colorbar, and the normalization is written
on the figure. Text uses Pillow's scalable default font (matplotlib's DejaVu Sans where Pillow is too old
for it). Curve figures need matplotlib (``pip install 'opendaam[eval]'``) and never a GUI.

Last layer of opendaam (beside :mod:`opendaam.report` and the CLI): imports heatmaps, tracing and the
dataset's Cityscapes table.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from opendaam.dataset.cityscapes import CITYSCAPES_COLOURS, CITYSCAPES_LABELS, IGNORE, label_palette
from opendaam.heatmaps import Heatmaps
from opendaam.tracing import upsample

__all__ = [
    "CITYSCAPES_COLOURS",
    "Scale",
    "color_label_image",
    "colormap",
    "colorize_labels",
    "curves_figure",
    "label_figure",
    "label_palette",
    "overlay_grid",
    "plot_ablation",
    "plot_curves",
    "plot_segmenter",
    "segmenter_figure",
    "shared_scale",
    "to_pil",
    "word_overlay",
]

# matplotlib's "inferno" at 17 evenly spaced points (CC0 data): dark for low values, so a weak map looks weak
# and the scale reads the same in colour and in greyscale.
_INFERNO = np.array([
    (0, 0, 4), (11, 7, 36), (33, 12, 74), (61, 9, 101), (87, 16, 110), (113, 25, 110), (138, 34, 106),
    (163, 44, 97), (188, 55, 84), (210, 70, 68), (228, 90, 49), (241, 115, 29), (249, 142, 9), (252, 172, 17),
    (249, 203, 53), (242, 234, 105), (252, 255, 164),
], dtype=np.float64)

_INK = (20, 20, 20)
_MUTED = (90, 90, 90)


def to_pil(image) -> Image.Image:
    """A PIL RGB image from a PIL image or an ``(H, W, 3)`` array in [0, 1] or uint8.

    Examples:
        >>> to_pil(np.zeros((4, 6, 3))).size
        (6, 4)
    """
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) as ``(..., 3)`` uint8 colours of the inferno colormap.

    Examples:
        >>> colormap(np.array([0.0, 1.0])).tolist()
        [[0, 0, 4], [252, 255, 164]]
    """
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(_INFERNO) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(_INFERNO) - 2)  # segment index
    frac = (x - low)[..., None]
    colours = _INFERNO[low] * (1.0 - frac) + _INFERNO[low + 1] * frac
    return np.round(colours).astype(np.uint8)


@dataclass(frozen=True)
class Scale:
    """A colour scale: raw map values ``low .. high`` shown as colormap 0 .. 1.

    Attributes:
        low: raw value drawn darkest (0 for DAAM-style ``"max"`` scales).
        high: raw value drawn brightest.
        kind: ``"max"`` (divide by the maximum, DAAM's eq. 3.4) or ``"minmax"`` (the thesis' linear maps).
        shared: what the scale is shared by, written on the figure (e.g. ``"row"``, ``"map"``).
    """

    low: float
    high: float
    kind: str = "max"
    shared: str = "row"

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Raw values mapped to [0, 1] (clipped).

        Examples:
            >>> Scale(0.0, 4.0).apply(np.array([1.0, 8.0])).tolist()
            [0.25, 1.0]
        """
        span = max(self.high - self.low, 1e-12)
        return np.clip((np.asarray(values, dtype=np.float64) - self.low) / span, 0.0, 1.0)

    def describe(self) -> str:
        """The normalization in words, as written on figures.

        Examples:
            >>> Scale(0.0, 0.5).describe()
            'colour scale shared by the row: 0 to 0.5 (its maximum)'
            >>> Scale(-1570.0, 5950.0, "minmax", "map").describe()
            'colour scale of the map: -1570 to 5950 (its minimum to maximum)'
        """
        span = "its maximum" if self.kind == "max" else "its minimum to maximum"
        owner = "shared by the" if self.shared in ("row", "figure", "method") else "of the"
        return f"colour scale {owner} {self.shared}: {_number(self.low)} to {_number(self.high)} ({span})"


def _number(value: float) -> str:
    """A short, exact-enough number for figure text: 3 significant digits, no exponent from 0.001 to 1e6.

    Examples:
        >>> [_number(v) for v in (0.0, 0.01234, 174.2, 5951.0, -1570.4, 2.5e-5, 3e7)]
        ['0', '0.0123', '174', '5951', '-1570', '2.5e-05', '3e+07']
    """
    magnitude = abs(value)
    if magnitude == 0:
        return "0"
    if 100 <= magnitude < 1e6:
        return f"{value:.0f}"
    if 1e-3 <= magnitude < 100:
        return f"{value:.3g}"
    return f"{value:.2g}"


def shared_scale(maps: Heatmaps | Sequence[Heatmaps], kind: str | None = None, shared: str = "row") -> Scale:
    """One colour scale for several maps: 0 to the largest value (``"max"``), or smallest to largest.

    The default kind follows :meth:`Heatmaps.normalized`: ``"minmax"`` for linear maps (they can be negative),
    ``"max"`` otherwise. Computed on the image-size maps that masks are cut from.

    Examples:
        >>> import torch
        >>> maps = Heatmaps(torch.tensor([[[0.0, 2.0]], [[0.5, 0.5]]]), ["car", "sky"], image_size=(1, 2))
        >>> shared_scale(maps)
        Scale(low=0.0, high=2.0, kind='max', shared='row')
    """
    group = [maps] if isinstance(maps, Heatmaps) else list(maps)
    kind = kind or ("minmax" if group[0].method == "linear" else "max")
    if kind not in ("max", "minmax"):
        raise ValueError(f"the colour scale must be 'max' or 'minmax', not {kind!r}")
    values = [m.soft.detach().float() for m in group]
    high = max(float(v.max()) for v in values)
    low = 0.0 if kind == "max" else min(float(v.min()) for v in values)
    return Scale(low=low, high=high, kind=kind, shared=shared)


# -- drawing helpers --------------------------------------------------------------------------------------


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A legible scalable font: Pillow's own (>= 10.1 with FreeType), else matplotlib's, else the bitmap one."""
    try:
        font = ImageFont.load_default(size=size)
        if isinstance(font, ImageFont.FreeTypeFont):
            return font
    except (TypeError, OSError):  # Pillow < 10.1 has no size argument
        pass
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    """Width in pixels of ``text`` drawn in ``font``."""
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis until it fits ``width`` pixels."""
    if _text_width(draw, text, font) <= width:
        return text
    while len(text) > 1 and _text_width(draw, text + "…", font) > width:
        text = text[:-1]
    return text + "…"


def _display_size(image_size: tuple[int, int], cell: int) -> tuple[int, int]:
    """``(width, height)`` with the longer side ``cell``, keeping the image's aspect ratio."""
    height, width = image_size
    factor = cell / max(height, width)
    return max(1, round(width * factor)), max(1, round(height * factor))


def _map_values(maps: Heatmaps, index: int, size: tuple[int, int]) -> np.ndarray:
    """One map upsampled from latent size straight to ``size`` ``(width, height)`` with the maps' interpolation."""
    latent = maps.latent[index].detach().float().cpu()
    mode = "bilinear" if maps.mode == "nearest" else maps.mode  # a display never shows latent blocks
    return upsample(latent, (size[1], size[0]), mode).numpy()


def _blend(base: Image.Image, values01: np.ndarray, alpha: float) -> Image.Image:
    """The map's colours over a dimmed greyscale copy of ``base`` (so the colours read as the map's only)."""
    grey = np.asarray(base.convert("L").convert("RGB"), dtype=np.float64) * 0.85
    heat = colormap(values01).astype(np.float64)
    return Image.fromarray(np.round(grey * (1.0 - alpha) + heat * alpha).astype(np.uint8))


def _colorbar(draw: ImageDraw.ImageDraw, canvas: Image.Image, box: tuple[int, int, int, int], scale: Scale,
              font) -> None:
    """A vertical colorbar in ``box`` (left, top, width, height) with raw-value ticks at both ends and the middle."""
    left, top, width, height = box
    ramp = np.linspace(1.0, 0.0, height)[:, None].repeat(width, axis=1)  # (height, width), top is high
    canvas.paste(Image.fromarray(colormap(ramp)), (left, top))
    draw.rectangle((left, top, left + width - 1, top + height - 1), outline=_MUTED)
    ticks = [(scale.high, top), ((scale.low + scale.high) / 2, top + height // 2), (scale.low, top + height - 1)]
    for value, y in ticks:
        draw.line((left + width, y, left + width + 4, y), fill=_MUTED)
        bbox = draw.textbbox((0, 0), _number(value), font=font)
        draw.text((left + width + 7, y - (bbox[3] + bbox[1]) // 2), _number(value), fill=_INK, font=font)


def _ticks_width(draw: ImageDraw.ImageDraw, scale: Scale, font) -> int:
    """Room the colorbar's tick labels need right of the bar."""
    values = (scale.low, (scale.low + scale.high) / 2, scale.high)
    return 12 + max(_text_width(draw, _number(v), font) for v in values)


# -- grids and overlays ---------------------------------------------------------------------------------------


def overlay_grid(image, rows: Sequence[tuple[str, Heatmaps]], cell: int = 256, alpha: float = 0.6,
                 scales: Sequence[Scale] | None = None) -> Image.Image:
    """A grid: per row, the image, then one overlay per label, all on the row's shared colour scale.

    Each row is titled with its name and its normalization, and ends in a colorbar of raw map values, so
    a flat map of a word the image does not show stays dark beside the object's map.

    Args:
        image: the generated image (PIL or array); upscaled bicubic to ``cell`` pixels on its longer side.
        rows: ``(title, heatmaps)`` pairs, e.g. one per method.
        cell: tile size in pixels (longer side).
        alpha: weight of the map's colours over the dimmed greyscale image.
        scales: one colour scale per row (default: :func:`shared_scale` of the row).

    Examples:
        >>> import torch
        >>> maps = Heatmaps(torch.rand(2, 4, 4), ["car", "tree"], image_size=(8, 8))
        >>> overlay_grid(np.zeros((8, 8, 3)), [("daam", maps)], cell=32).size[1] > 32
        True
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one (title, heatmaps) row")
    base = to_pil(image)
    scales = list(scales) if scales is not None else [shared_scale(maps) for _, maps in rows]
    tile_w, tile_h = _display_size((base.height, base.width), cell)
    title_font, label_font = _font(max(12, cell // 13)), _font(max(11, cell // 16))
    tick_font = _font(max(10, cell // 19))
    pad, title_h, label_h, bar_w = max(4, cell // 32), max(18, cell // 9), max(15, cell // 12), max(8, cell // 18)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    row_w = [pad + (1 + len(maps)) * (tile_w + pad) + bar_w + _ticks_width(measure, scale, tick_font)
             for (_, maps), scale in zip(rows, scales, strict=True)]
    row_h = title_h + label_h + tile_h + pad
    width = max(row_w)
    canvas = Image.new("RGB", (width, pad + len(rows) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    shown = base.resize((tile_w, tile_h), Image.BICUBIC)
    for r, ((title, maps), scale) in enumerate(zip(rows, scales, strict=True)):
        top = pad + r * row_h
        heading = f"{title}  ·  {scale.describe()}"
        draw.text((pad, top), _fit(draw, heading, title_font, width - 2 * pad), fill=_INK, font=title_font)
        tiles_top = top + title_h + label_h
        draw.text((pad, top + title_h), "image", fill=_MUTED, font=label_font)
        canvas.paste(shown, (pad, tiles_top))
        for c, label in enumerate(maps.labels, start=1):
            left = pad + c * (tile_w + pad)
            draw.text((left, top + title_h), _fit(draw, label, label_font, tile_w), fill=_INK, font=label_font)
            values = scale.apply(_map_values(maps, c - 1, (tile_w, tile_h)))
            canvas.paste(_blend(shown, values, alpha), (left, tiles_top))
        bar_left = pad + (1 + len(maps)) * (tile_w + pad)  # right after the row's last tile
        _colorbar(draw, canvas, (bar_left, tiles_top, bar_w, tile_h), scale, tick_font)
    return canvas


def word_overlay(image, maps: Heatmaps, label: str | int = 0, size: int = 256, alpha: float = 0.6,
                 scale: Scale | None = None) -> Image.Image:
    """One label's map over the image, titled with the word and the method, with a colorbar.

    The picture is at least ``size`` pixels on its longer side (at the image's own resolution when that is
    larger): the image is upscaled bicubic and the map upsampled from its latent size.

    Args:
        image: the generated image.
        maps: the maps; ``label`` picks one (name or position).
        size: minimum longer side of the overlay in pixels.
        alpha: weight of the map's colours.
        scale: colour scale (default: the map's own, normalized as :meth:`Heatmaps.normalized`).

    Examples:
        >>> import torch
        >>> maps = Heatmaps(torch.rand(1, 4, 4), ["car"], image_size=(64, 64))
        >>> word_overlay(np.zeros((64, 64, 3)), maps, "car").size[1] > 256
        True
    """
    base = to_pil(image)
    index = maps._index(label)
    scale = scale or shared_scale(Heatmaps(maps.latent[index:index + 1], [maps.labels[index]], method=maps.method,
                                           image_size=maps.image_size, mode=maps.mode), shared="map")
    tile_w, tile_h = _display_size((base.height, base.width), max(size, base.width, base.height))
    title_font, small = _font(max(14, tile_h // 16)), _font(max(12, tile_h // 21))
    pad, title_h, note_h = max(6, tile_h // 40), max(22, tile_h // 11), max(20, tile_h // 12)
    bar_w = max(10, tile_h // 20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = pad * 3 + tile_w + bar_w + _ticks_width(measure, scale, small)
    note = scale.describe()
    if _text_width(measure, note, small) > width - 2 * pad:  # two lines: what the scale is, then its range
        note = note.replace(": ", ":\n", 1)
    note_h = max(note_h, measure.multiline_textbbox((0, 0), note, font=small)[3] + 6)
    canvas = Image.new("RGB", (width, pad * 2 + title_h + tile_h + note_h), "white")
    draw = ImageDraw.Draw(canvas)
    heading = f"{maps.labels[index]}  ·  {maps.method}"
    draw.text((pad, pad), _fit(draw, heading, title_font, canvas.width - 2 * pad), fill=_INK, font=title_font)
    shown = base.resize((tile_w, tile_h), Image.BICUBIC)
    values = scale.apply(_map_values(maps, index, (tile_w, tile_h)))
    canvas.paste(_blend(shown, values, alpha), (pad, pad + title_h))
    _colorbar(draw, canvas, (pad * 2 + tile_w, pad + title_h, bar_w, tile_h), scale, small)
    draw.multiline_text((pad, pad + title_h + tile_h + 3), note, fill=_MUTED, font=small, spacing=2)
    return canvas


# -- label maps ------------------------------------------------------------------------------------------------


def _value_names(ids: str, classes: Sequence[str | dict] | None) -> dict[int, str]:
    """Label value -> class name, for legends."""
    if classes is not None:
        names = {v: (c["name"] if isinstance(c, dict) else c) for v, c in enumerate(classes, start=1)}
        return {0: "background", **names, IGNORE: "ignore"}
    if ids == "train":
        return {**{lab.train_id: lab.name for lab in CITYSCAPES_LABELS if lab.train_id != IGNORE}, IGNORE: "ignore"}
    return {**{lab.id: lab.name for lab in CITYSCAPES_LABELS}, IGNORE: "ignore"}


def colorize_labels(label_ids, ids: str = "label", classes: Sequence[str | dict] | None = None) -> Image.Image:
    """A label map as a palette PNG image (mode ``P``): values stay the label ids, viewers show Cityscapes colours.

    Saving it keeps the ids readable (``np.array(Image.open(path))`` gives them back) while the file looks
    like Cityscapes' colour images.

    Args:
        label_ids: ``(H, W)`` integer label map with values in 0..255.
        ids: ``"label"`` or ``"train"``, see :func:`label_palette`.
        classes: class names of values 1..K, see :func:`label_palette`.

    Examples:
        >>> image = colorize_labels(np.array([[26, 7]], dtype=np.uint8))
        >>> image.mode, image.convert("RGB").getpixel((0, 0)), np.array(image).tolist()
        ('P', (0, 0, 142), [[26, 7]])
    """
    array = np.asarray(label_ids)
    if array.ndim != 2 or array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label_ids must be an (H, W) map of values 0..255, got shape {array.shape}")
    image = Image.fromarray(array.astype(np.uint8), mode="L").convert("P")
    image.putpalette(label_palette(ids, classes).reshape(-1).tolist())
    return image


def color_label_image(label_ids, ids: str = "label", classes: Sequence[str | dict] | None = None) -> Image.Image:
    """A label map as an RGBA colour image, like Cityscapes' ``*_gtFine_color.png``.

    Examples:
        >>> color_label_image(np.array([[24]], dtype=np.uint8)).getpixel((0, 0))
        (220, 20, 60, 255)
    """
    return colorize_labels(label_ids, ids, classes).convert("RGBA")


def label_figure(image, label_ids, ids: str = "label", classes: Sequence[str | dict] | None = None,
                 size: int = 256) -> Image.Image:
    """The image beside its coloured label map, with a legend of the classes present.

    The image is upscaled bicubic, the label map nearest-neighbour (labels must not blend).

    Args:
        image: the image the labels belong to.
        label_ids: ``(H, W)`` label values.
        ids: ``"label"`` or ``"train"``, see :func:`label_palette`.
        classes: the classes of values 1..K, see :func:`label_palette`.
        size: longer side of each panel in pixels.

    Examples:
        >>> figure = label_figure(np.zeros((8, 8, 3)), np.full((8, 8), 26, dtype=np.uint8), size=64)
        >>> figure.getpixel((64 + 12, 20))
        (0, 0, 142)
    """
    base = to_pil(image)
    labels = np.asarray(label_ids)
    width, height = _display_size(labels.shape, size)
    font = _font(max(12, size // 18))
    pad, swatch = max(4, size // 32), max(10, size // 18)
    names = _value_names(ids, classes)
    table = label_palette(ids, classes)
    present = [int(v) for v in np.unique(labels)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    legend_w = 2 * pad + swatch + max(_text_width(measure, names.get(v, str(v)), font) for v in present)
    line_h = swatch + pad
    canvas = Image.new("RGB", (3 * pad + 2 * width + legend_w + pad, max(height, len(present) * line_h) + 2 * pad),
                       "white")
    canvas.paste(base.resize((width, height), Image.BICUBIC), (pad, pad))
    canvas.paste(colorize_labels(labels, ids, classes).convert("RGB").resize((width, height), Image.NEAREST),
                 (2 * pad + width, pad))
    draw = ImageDraw.Draw(canvas)
    left = 3 * pad + 2 * width
    for i, value in enumerate(present):
        top = pad + i * line_h
        draw.rectangle((left, top, left + swatch - 1, top + swatch - 1), fill=tuple(int(c) for c in table[value]),
                       outline=_MUTED)
        name = names.get(value, str(value))
        bbox = draw.textbbox((0, 0), name, font=font)
        draw.text((left + swatch + pad, top + (swatch - bbox[3] - bbox[1]) // 2), name, fill=_INK, font=font)
    return canvas


# -- curves (matplotlib) ------------------------------------------------------------------------------------


def _pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend, or one line naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'opendaam[eval]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_figure(summary: dict, methods: Sequence[str] | None = None):
    """The matplotlib figure of :func:`plot_curves` (for notebooks, or to add to it before saving).

    Examples:
        >>> summary = {"thresholds": [0.0, 1.0], "methods": {"daam": {"car": {
        ...     "curve": [10.0, 50.0], "band": [[5.0, 15.0], [40.0, 60.0]], "images": 3}}}}
        >>> fig = curves_figure(summary)
        >>> fig.axes[0].get_title(), len(fig.legends)
        ('car, 3 images', 1)
    """
    plt = _pyplot()
    taus = summary["thresholds"]
    chosen = list(methods or summary["methods"])
    classes = [c for c in summary["methods"][chosen[0]] if c != "all"]
    fig, axes = plt.subplots(1, len(classes), figsize=(3.6 * len(classes) + 0.4, 3.8), squeeze=False, sharey=True)
    for ax, cls in zip(axes[0], classes, strict=True):
        counts = {summary["methods"][m][cls].get("images") for m in chosen} - {None}
        for method in chosen:
            row = summary["methods"][method][cls]
            line = ax.plot(taus, row["curve"], label=method, linewidth=1.6)[0]
            band = np.asarray(row["band"])
            ax.fill_between(taus, band[:, 0], band[:, 1], color=line.get_color(), alpha=0.12, linewidth=0)
        images = f", {counts.pop()} images" if len(counts) == 1 else ""
        ax.set_title(f"{cls}{images}", fontsize=11)
        ax.set_xlabel("threshold tau")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mIoU (x100)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    columns = min(len(labels), 8)
    legend_rows = -(-len(labels) // columns)
    fig.suptitle("mIoU over thresholds: line = mean of per-image IoU, band = 5th-95th percentile", fontsize=11)
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.07 * legend_rows + 0.02, 1, 1))  # room for the legend below the panels
    return fig


def plot_curves(summary: dict, path, methods: Sequence[str] | None = None) -> None:
    """mIoU-vs-threshold curves per class with 5th-95th percentile bands (the thesis' figures 4.3/4.5/4.8).

    One panel per class, titled with the class and its number of images; one legend for the figure, below
    the panels, so it never covers a curve.

    Args:
        summary: a summary with ``"thresholds"`` and ``"methods"`` as written by the experiment/evaluation.
        path: PNG file to write.
        methods: which methods to draw (default: all).
    """
    plt = _pyplot()
    fig = curves_figure(summary, methods)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ablation(result: dict, path) -> None:
    """The block x step max-mIoU matrix of :func:`opendaam.experiments.ablation` as a heatmap figure."""
    plt = _pyplot()
    matrix = np.asarray(result["miou"])
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * matrix.shape[1] + 2), 0.45 * matrix.shape[0] + 1.8))
    image = ax.imshow(matrix, aspect="auto", cmap="inferno", vmin=0, vmax=max(1.0, float(matrix.max())))
    ax.set_yticks(range(len(result["blocks"])), result["blocks"])
    ax.set_xticks(range(len(result["steps"])), result["steps"], fontsize=6)
    ax.set_xlabel("U-Net call (step)")
    title = "max mIoU (x100) of the maps of one block and step"
    if result.get("method") or result.get("class"):
        title += f": {result.get('method', '')} {result.get('class', '')}".rstrip()
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="max mIoU (x100), scale 0 to the matrix's max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def segmenter_figure(summary: dict):
    """The figure of :func:`plot_segmenter` (for notebooks, or to add to it before saving).

    Examples:
        >>> summary = {"iou": {"real_only": {"background": 90.0, "car": 50.0},
        ...                    "synthetic_only/daam": {"background": 80.0, "car": None}},
        ...            "miou": {"real_only": 70.0, "synthetic_only": {"daam": 80.0}}}
        >>> [ax.get_title() for ax in segmenter_figure(summary).axes]
        ['mIoU per training set', 'IoU per class']
    """
    plt = _pyplot()
    arms = list(summary["iou"])
    names = list(next(iter(summary["iou"].values())))

    def miou(arm: str) -> float:
        kind, _, labeller = arm.partition("/")
        return summary["miou"][kind][labeller] if labeller else summary["miou"][kind]

    colours = {"real_only": "#4c72b0", "synthetic_only": "#dd8452", "few_real": "#55a868",
               "few_real_plus_synthetic": "#8172b3"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.0), gridspec_kw={"width_ratios": [1, 1.4]})
    values = [miou(arm) for arm in arms]
    bars = left.barh(range(len(arms)), values, color=[colours.get(a.partition("/")[0], "grey") for a in arms])
    left.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    left.set_yticks(range(len(arms)), arms, fontsize=8)
    left.invert_yaxis()
    left.set_xlim(0, 100)
    left.set_xlabel("mIoU (x100), background and classes")
    left.set_title("mIoU per training set")
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        ious = [summary["iou"][arm][n] for n in names]
        right.bar(np.arange(len(names)) + (k - (len(arms) - 1) / 2) * width,
                  [np.nan if v is None else v for v in ious], width, label=arm,
                  color=colours.get(arm.partition("/")[0], "grey"), alpha=0.45 + 0.55 * (k + 1) / len(arms),
                  edgecolor="white", linewidth=0.4)
    right.set_xticks(range(len(names)), names)
    right.set_ylim(0, 100)
    right.set_ylabel("IoU (x100)")
    right.set_title("IoU per class")
    # below the axes, so that no bar is hidden behind it
    right.legend(fontsize=7, ncol=3, frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    return fig


def plot_segmenter(summary: dict, path) -> None:
    """The synthetic-to-real experiment's figure: mIoU per training set and IoU per class, as a PNG."""
    plt = _pyplot()
    fig = segmenter_figure(summary)
    fig.savefig(path, dpi=120)
    plt.close(fig)
