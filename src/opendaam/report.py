"""A self-contained HTML page for an output folder: images, maps with colorbars, words and facts.

The page embeds every picture as a base64 PNG and uses no script, font or style sheet from elsewhere, so it
opens offline and can be mailed as one file. It understands the folders of ``opendaam demo`` (a
``summary.json`` with ``"images"`` and ``<name>_maps.npz``), ``opendaam generate`` (``summary.json`` with
``"words"``, ``image.png`` and ``maps/<word>.npy``) and ``opendaam dataset generate`` (``dataset.json`` and
the manifest: items with Cityscapes-coloured labels); for any other folder with PNGs (e.g. an experiment's
``curves.png`` and ``tables.md``) it shows those and the summary's top-level facts.

Last layer of opendaam, beside :mod:`opendaam.viz` (which draws the pictures).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from opendaam._io import atomic_write_with
from opendaam.dataset.io import read_manifest
from opendaam.heatmaps import Heatmaps
from opendaam.viz import label_figure, shared_scale, word_overlay

__all__ = ["demo_maps", "write_html"]

_STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1400px;padding:0 1em;
color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:left}
th{background:#f4f4f4}.maps{display:flex;flex-wrap:wrap;gap:.6em}figure{margin:0}
figcaption{font-size:.85em;color:#555}img{image-rendering:auto;max-width:100%}pre{background:#f7f7f7;padding:.8em;
overflow-x:auto}.note{color:#555;font-size:.9em}
"""


def _png_data(image: Image.Image) -> str:
    """A ``data:`` URL of the image as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=3)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(image: Image.Image, alt: str, caption: str | None = None) -> str:
    """An ``<img>`` (in a ``<figure>`` when captioned) embedding ``image``."""
    tag = f'<img src="{_png_data(image)}" alt="{html.escape(alt)}" width="{image.width}" height="{image.height}">'
    if caption is None:
        return tag
    return f"<figure>{tag}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _table(rows: list[list], header: list[str]) -> str:
    """An HTML table; cells are escaped text."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _facts(summary: dict, skip: tuple[str, ...]) -> str:
    """The summary's plain values (numbers, text, short lists) and one level of nested ones, as a table."""
    rows = []
    for key, value in summary.items():
        if key in skip:
            continue
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, item in items:
            if isinstance(item, (str, int, float, bool)) or item is None or (
                    isinstance(item, list) and len(item) <= 12 and all(not isinstance(v, (dict, list)) for v in item)):
                rows.append([key if sub is None else f"{key}.{sub}", item if not isinstance(item, float)
                             else f"{item:.6g}"])
    return _table(rows, ["fact", "value"]) if rows else ""


def _map_figures(image: Image.Image, maps: Heatmaps, size: int) -> str:
    """One overlay per label on the maps' shared colour scale, as a row of figures."""
    scale = shared_scale(maps)
    figures = [_img(word_overlay(image, maps, i, size=size, scale=scale), f"{label} ({maps.method})")
               for i, label in enumerate(maps.labels)]
    note = f'<p class="note">{html.escape(maps.method)}: {html.escape(scale.describe())}</p>'
    return note + '<div class="maps">' + "".join(figures) + "</div>"


def demo_maps(folder: str | Path, entry: dict) -> list[Heatmaps]:
    """The maps of one demo image, read back from its ``<name>_maps.npz`` (one array per method).

    Args:
        folder: the demo's output folder.
        entry: the image's entry in the demo's ``summary.json`` (``"maps"``: method -> label -> facts).

    Returns:
        One :class:`Heatmaps` per method, labels in the summary's order.
    """
    folder = Path(folder)
    with np.load(folder / entry["arrays"], allow_pickle=False) as arrays:
        return [Heatmaps(torch.from_numpy(arrays[method]), list(labels), method=method,
                         image_size=tuple(entry["image_size"]))
                for method, labels in entry["maps"].items()]


def _demo_body(folder: Path, summary: dict, size: int) -> str:
    """Sections of a demo folder: per image, the image, the maps per method, the words."""
    parts = [_facts(summary, skip=("images",))]
    for entry in summary["images"]:
        image = Image.open(folder / entry["image"]).convert("RGB")
        shown = image.resize((size, round(size * image.height / image.width)), Image.BICUBIC)
        parts.append(f"<h2>{html.escape(entry['prompt'])}</h2>")
        parts.append(_img(shown, entry["prompt"], f"{entry['image']}, {image.width} x {image.height} px, "
                                                  f"shown at {shown.width} px (bicubic)"))
        for maps in demo_maps(folder, entry):
            parts.append(f"<h3>{html.escape(maps.method)}</h3>" + _map_figures(image, maps, size))
        rows = [[method, label, facts.get("mask_fraction_at_0.4", "")]
                for method, labels in entry["maps"].items() for label, facts in labels.items()]
        parts.append(_table(rows, ["method", "word", "mask fraction at tau 0.4"]))
    return "".join(parts)


def _generate_body(folder: Path, summary: dict, size: int) -> str:
    """Sections of a ``generate`` folder: the image, the maps of its words, the word table, provenance."""
    image = Image.open(folder / "image.png").convert("RGB")
    words = summary["words"]
    soft = np.stack([np.load(folder / "maps" / f"{w['file']}.npy", allow_pickle=False) for w in words])
    maps = Heatmaps(torch.from_numpy(soft.astype(np.float32)), [w["word"] for w in words],
                    method=summary.get("method", "daam"), image_size=(image.height, image.width))
    shown = image.resize((size, round(size * image.height / image.width)), Image.BICUBIC)
    parts = [f"<h2>{html.escape(summary.get('prompt', ''))}</h2>",
             _img(shown, "generated image", f"image.png, {image.width} x {image.height} px"),
             f"<h3>maps ({html.escape(maps.method)})</h3>", _map_figures(image, maps, size)]
    rows = [[w["word"], w.get("token_indices", ""), f"{w['min']:.4g}", f"{w['max']:.4g}", f"{w['mean']:.4g}",
             f"{w['mask_fraction']:.4f}"] for w in words]
    header = ["word", "token positions", "min", "max", "mean", f"mask fraction at tau {summary.get('tau')}"]
    parts.append(_table(rows, header))
    parts.append("<h3>settings and provenance</h3>" + _facts(summary, skip=("words", "tokens")))
    return "".join(parts)


def _dataset_body(folder: Path, header: dict, size: int, limit: int) -> str:
    """Sections of a dataset folder: its classes, then the first ``limit`` items with their coloured labels."""
    manifest = folder / "manifest.jsonl"
    paths = [manifest] if manifest.is_file() else sorted((folder / "shards").glob("manifest-*.jsonl"))
    entries = sorted((e for path in paths for e in read_manifest(path)), key=lambda e: e.get("index", 0))
    classes = header.get("classes", [])
    parts = [_table([["items finished", len(entries)], ["spec hash", header.get("spec_hash", "")],
                     ["opendaam", header.get("opendaam", "")]], ["fact", "value"]),
             "<h2>classes</h2>",
             _table([[c["id"], c["name"], c.get("cityscapes_id")] for c in classes],
                    ["label value", "class", "Cityscapes id"])]
    if entries:
        shown = min(limit, len(entries))
        parts.append(f"<h2>items ({shown} of {len(entries)})</h2>")
    for entry in entries[:limit]:
        image = Image.open(folder / entry["files"]["image"]).convert("RGB")
        labels = np.array(Image.open(folder / entry["files"]["label"]))
        masks = ", ".join(f"{m['class']} {m['area']:.1%} (confidence {m['confidence']:.2f})"
                          for m in entry.get("masks", []))
        caption = f"{entry['key']}: {entry['prompt']!r}, seed {entry['seed']}; {masks}"
        parts.append(_img(label_figure(image, labels, classes=classes, size=size), entry["prompt"], caption))
    return "".join(parts)


def _generic_body(folder: Path, summary: dict) -> str:
    """Any other folder: its PNGs, ``tables.md`` and the summary's top-level facts."""
    parts = [_facts(summary, skip=("methods", "thresholds"))]
    tables = folder / "tables.md"
    if tables.is_file():
        parts.append(f"<h2>tables</h2><pre>{html.escape(tables.read_text())}</pre>")
    for path in sorted(folder.glob("*.png")):
        parts.append(f"<h2>{html.escape(path.name)}</h2>" + _img(Image.open(path).convert("RGB"), path.stem))
    return "".join(parts)


def write_html(folder: str | Path, out: str | Path | None = None, title: str | None = None,
               size: int = 256, limit: int = 24) -> Path:
    """Write a self-contained ``index.html`` for an output folder of ``demo``, ``generate``, ``dataset generate``
    or another command.

    Args:
        folder: the output folder (with ``summary.json``, or at least PNG files).
        out: the HTML file (default ``folder/index.html``); written atomically.
        title: page title (default: the folder's name).
        size: longer side of the shown images and overlays in pixels.
        limit: at most this many items of a dataset are shown.

    Returns:
        The path written.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> Image.new("RGB", (8, 8)).save(folder / "curves.png")
        >>> write_html(folder).read_text().count("<img")
        1
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no folder {folder}: pass the output folder of opendaam demo or generate")
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if (folder / "dataset.json").is_file():
        body = _dataset_body(folder, json.loads((folder / "dataset.json").read_text()), size, limit)
    elif isinstance(summary.get("images"), list):
        body = _demo_body(folder, summary, size)
    elif isinstance(summary.get("words"), list) and (folder / "image.png").is_file():
        body = _generate_body(folder, summary, size)
    elif summary or any(folder.glob("*.png")):
        body = _generic_body(folder, summary)
    else:
        raise FileNotFoundError(f"{folder} has no summary.json and no PNG: pass an output folder of opendaam")
    heading = html.escape(title or folder.resolve().name)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{heading}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{heading}</h1>{body}</body></html>\n")
    target = Path(out) if out is not None else folder / "index.html"
    return atomic_write_with(target, lambda tmp: tmp.write_text(page, encoding="utf-8"))
