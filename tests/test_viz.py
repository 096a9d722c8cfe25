"""Pictures: shared colour scales, overlay sizes, palette label images, curve legends, no matplotlib needed."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from opendaam.heatmaps import Heatmaps
from opendaam.viz import (
    color_label_image,
    colorize_labels,
    colormap,
    curves_figure,
    overlay_grid,
    plot_curves,
    shared_scale,
    word_overlay,
)


def _count_near(image: Image.Image, colour, tolerance: int = 1) -> int:
    """Pixels of ``image`` within ``tolerance`` of ``colour`` in every channel."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - np.asarray(colour, dtype=np.int16)) <= tolerance).all(axis=-1).sum())


def test_grid_row_shares_one_colour_scale():
    # An object's map (1.0 everywhere) and a flat weak map (0.1) over a black image: on the row's shared
    # scale the weak map's tile must be dark, not as bright as the object's (each tile on its own max would
    # draw both at colormap(1)).
    maps = Heatmaps(torch.stack([torch.ones(4, 4), torch.full((4, 4), 0.1)]), ["car", "sky"], image_size=(16, 16))
    grid = overlay_grid(np.zeros((16, 16, 3)), [("daam", maps)], cell=40, alpha=0.6)
    bright = np.round(colormap(np.array(1.0)) * 0.6)
    dark = np.round(colormap(np.array(0.1)) * 0.6)
    assert _count_near(grid, bright) >= 40 * 40
    assert _count_near(grid, dark) >= 40 * 40
    assert dark.sum() < bright.sum() / 3


def test_shared_scale_per_method():
    soft = torch.tensor([[[0.0, 2.0]], [[-1.0, 0.5]]])
    assert shared_scale(Heatmaps(soft, ["a", "b"], image_size=(1, 2))).high == 2.0
    linear = shared_scale(Heatmaps(soft, ["a", "b"], method="linear", image_size=(1, 2)))
    assert (linear.low, linear.high, linear.kind) == (-1.0, 2.0, "minmax")
    assert "-1 to 2" in linear.describe()
    with pytest.raises(ValueError, match="'max' or 'minmax'"):
        shared_scale(Heatmaps(soft, ["a", "b"], image_size=(1, 2)), kind="sum")


def test_word_overlay_is_at_least_256_px_and_at_image_resolution():
    small = Heatmaps(torch.rand(1, 16, 16), ["car"], image_size=(64, 64))
    picture = word_overlay(np.zeros((64, 64, 3)), small, "car")
    assert picture.height > 256 and picture.width > 256
    large = Heatmaps(torch.rand(1, 16, 24), ["car"], image_size=(320, 480))
    picture = word_overlay(np.zeros((320, 480, 3)), large, "car")
    assert picture.width > 480 and picture.height > 320


def test_overlay_is_upscaled_smoothly():
    # A map with one hot latent pixel: nearest-neighbour upscaling would give a block of two colours only.
    latent = torch.zeros(1, 4, 4)
    latent[0, 1, 1] = 1.0
    maps = Heatmaps(latent, ["car"], image_size=(4, 4))
    grid = overlay_grid(np.zeros((4, 4, 3)), [("daam", maps)], cell=64)
    pad, title_h, label_h = 4, 18, 15  # the grid's layout at cell=64: the map tile follows the image tile
    tile = np.asarray(grid.convert("L"))[pad + title_h + label_h:, pad + 64 + pad:][:64, :64]
    assert tile.shape == (64, 64) and tile.max() < 255  # all of it is the tile, no white margin
    assert len(np.unique(tile)) > 20


def test_palette_label_image():
    labels = np.array([[26, 24], [7, 255]], dtype=np.uint8)
    image = colorize_labels(labels)
    assert image.mode == "P"
    assert np.array(image).tolist() == labels.tolist()  # the ids stay readable
    rgb = image.convert("RGB")
    # Cityscapes' published colours: car, person, road; 255 (ignore) black.
    assert [rgb.getpixel(xy) for xy in [(0, 0), (1, 0), (0, 1), (1, 1)]] == [
        (0, 0, 142), (220, 20, 60), (128, 64, 128), (0, 0, 0)]
    assert colorize_labels(np.array([[13]]), ids="train").convert("RGB").getpixel((0, 0)) == (0, 0, 142)
    assert colorize_labels(np.array([[2]]), classes=["car", "person"]).convert("RGB").getpixel((0, 0)) == (
        220, 20, 60)
    colour = color_label_image(labels)
    assert colour.mode == "RGBA" and colour.getpixel((0, 1)) == (128, 64, 128, 255)


def test_palette_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(H, W\) map of values 0..255"):
        colorize_labels(np.zeros((2, 2, 3)))
    with pytest.raises(ValueError, match="'label'"):
        colorize_labels(np.zeros((2, 2)), ids="coco")


def test_palette_png_round_trip(tmp_path):
    labels = np.array([[0, 19, 23]], dtype=np.uint8)
    colorize_labels(labels).save(tmp_path / "labels.png")
    again = Image.open(tmp_path / "labels.png")
    assert again.mode == "P" and np.array(again).tolist() == labels.tolist()
    assert again.convert("RGB").getpixel((2, 0)) == (70, 130, 180)  # sky


def _summary(methods=("daam", "linear")):
    taus = np.linspace(0, 1, 11).tolist()
    rows = {cls: {"curve": [50 * t for t in taus], "band": [[40 * t, 60 * t] for t in taus], "images": 7}
            for cls in ("car", "person")}
    return {"thresholds": taus, "methods": {m: rows for m in methods}}


def test_curve_legend_is_outside_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    fig = curves_figure(_summary(("daam", "linear", "open_vocab", "class_prior")))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    for ax in fig.axes:
        assert not legend.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    assert [ax.get_title() for ax in fig.axes] == ["car, 7 images", "person, 7 images"]
    assert all(ax.get_legend() is None for ax in fig.axes)
    plot_curves(_summary(), tmp_path / "curves.png")
    assert Image.open(tmp_path / "curves.png").size[0] > 500


def test_pictures_without_matplotlib(monkeypatch):
    import opendaam.viz as viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a plain install
    viz._font.cache_clear()
    try:
        maps = Heatmaps(torch.rand(2, 4, 4), ["car", "tree"], image_size=(16, 16))
        assert overlay_grid(np.zeros((16, 16, 3)), [("daam", maps)]).width > 3 * 256
        assert word_overlay(np.zeros((16, 16, 3)), maps, 1).height > 256
        with pytest.raises(ImportError, match=r"pip install 'opendaam\[eval\]'"):
            plot_curves(_summary(), "unused.png")
    finally:
        viz._font.cache_clear()
