"""Ground-truth masks for images the toy-urban model makes.

Two annotators:

* **img2img** (:func:`img2img_scene`): start from a rendered scene and let the model redraw it with
  ``StableDiffusionImg2ImgPipeline`` at a moderate ``strength``; the rendered label map is the ground truth
  (the layout survives at the documented strength, see ``assets/toy-urban/TRAINING.md``).
* **segmentation net** (:class:`SegNet`, :func:`annotate`): a small convolutional network trained on
  rendered scenes, half of them passed through the toy-urban autoencoder so it also knows the decoder's
  blur, for masks of text-to-image generations. Its per-class IoU on held-out rendered scenes is measured
  by :func:`evaluate_annotator` and written in ``TRAINING.md``.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from opendaam.toyworld.scene import LABEL_IDS, render_scene, template_caption

__all__ = [
    "ANNOTATOR_DIR",
    "SEG_LABELS",
    "SegNet",
    "annotate",
    "evaluate_annotator",
    "img2img_scene",
    "load_annotator",
    "train_annotator",
]

ANNOTATOR_DIR = Path(__file__).resolve().parent.parent / "assets" / "toy-urban-annotator"
"""Where the trained segmentation net ships (``model.safetensors`` and ``config.json``)."""

SEG_LABELS: tuple[str, ...] = (
    "road", "sidewalk", "building", "pole", "traffic light", "vegetation", "sky", "person", "rider", "car",
    "motorcycle", "bicycle", "traffic sign", "truck", "bus",
)
"""The classes the world draws, in the order of the net's output channels (a net trained before the
look-alike classes existed has only the first 12)."""

_ID_LUT = np.zeros(256, dtype=np.int64)  # Cityscapes id -> channel index
for _i, _name in enumerate(SEG_LABELS):
    _ID_LUT[LABEL_IDS[_name]] = _i
_CHANNEL_IDS = np.array([LABEL_IDS[n] for n in SEG_LABELS], dtype=np.uint8)  # channel index -> Cityscapes id

HELD_OUT_ANNOTATOR = 20_000_000
"""Seeds of the annotator's held-out evaluation scenes (never trained on by either model)."""


class SegNet(nn.Module):
    """A small encoder-decoder segmentation net for 64 x 64 toy-urban images (~0.2 M parameters).

    Examples:
        >>> net = SegNet()
        >>> tuple(net(torch.zeros(1, 3, 64, 64)).shape)
        (1, 15, 64, 64)
    """

    def __init__(self, width: int = 16, classes: int = len(SEG_LABELS)):
        super().__init__()

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.SiLU(),
                                 nn.Conv2d(cout, cout, 3, 1, 1), nn.GroupNorm(4, cout), nn.SiLU())

        w = width
        self.enc1 = block(3, w)  # 64 x 64
        self.enc2 = block(w, 2 * w, 2)  # 32 x 32
        self.enc3 = block(2 * w, 4 * w, 2)  # 16 x 16
        self.enc4 = block(4 * w, 4 * w, 2)  # 8 x 8: context (a person on a bike is a rider)
        self.dec3 = block(8 * w, 4 * w)
        self.dec2 = block(6 * w, 2 * w)
        self.dec1 = block(3 * w, w)
        self.head = nn.Conv2d(w, classes, 1)
        self.config = {"width": width, "classes": classes}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, classes, H, W) of images (N, 3, H, W) in [-1, 1]."""
        e1 = self.enc1(x)  # (N, w, 64, 64)
        e2 = self.enc2(e1)  # (N, 2w, 32, 32)
        e3 = self.enc3(e2)  # (N, 4w, 16, 16)
        e4 = self.enc4(e3)  # (N, 4w, 8, 8)
        up = F.interpolate(e4, scale_factor=2, mode="bilinear", align_corners=False)
        d3 = self.dec3(torch.cat([up, e3], 1))  # (N, 4w, 16, 16)
        up = F.interpolate(d3, scale_factor=2, mode="bilinear", align_corners=False)
        d2 = self.dec2(torch.cat([up, e2], 1))  # (N, 2w, 32, 32)
        up = F.interpolate(d2, scale_factor=2, mode="bilinear", align_corners=False)
        d1 = self.dec1(torch.cat([up, e1], 1))  # (N, w, 64, 64)
        return self.head(d1)


def _to_tensor(images) -> torch.Tensor:
    """(N, 3, H, W) floats in [-1, 1] from uint8 arrays (N, H, W, 3), one array, PIL images or a tensor."""
    if isinstance(images, torch.Tensor):
        return images.float()
    if not isinstance(images, list | tuple):
        images = [images]
    array = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if array.ndim == 3:
        array = array[None]
    x = torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)  # (N, H, W, 3)
    return x.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def annotate(images, net: SegNet | None = None) -> np.ndarray:
    """Cityscapes label maps (N, H, W) ``uint8`` predicted for images (PIL, uint8 arrays or [-1, 1] tensor).

    Examples:
        >>> labels = annotate([render_scene(0).image], SegNet())
        >>> labels.shape, labels.dtype
        ((1, 64, 64), dtype('uint8'))
    """
    net = net or load_annotator()
    net.eval()
    logits = net(_to_tensor(images))  # (N, C, H, W)
    return _CHANNEL_IDS[logits.argmax(1).numpy()]


def _scenes(seeds) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 64, 64) in [-1, 1] and channel-index targets (N, 64, 64) of rendered scenes."""
    scenes = [render_scene(int(s)) for s in seeds]
    images = _to_tensor([s.image for s in scenes])
    targets = torch.from_numpy(_ID_LUT[np.stack([s.labels for s in scenes])])  # (N, 64, 64)
    return images, targets


@torch.no_grad()
def _roundtrip(vae, images: torch.Tensor) -> torch.Tensor:
    """Images passed through the autoencoder (encode to the latent mean, decode), clamped to [-1, 1]."""
    out = [vae.decode(vae.encode(images[i:i + 64]).latent_dist.mean).sample for i in range(0, len(images), 64)]
    return torch.cat(out).clamp(-1, 1)


def train_annotator(out: str | Path, vae=None, steps: int = 600, scenes: int = 4000, batch: int = 32,
                    lr: float = 3e-3, seed: int = 0, threads: int = 1, balance: bool = True,
                    log=print) -> SegNet:
    """Train the segmentation net on rendered scenes (half of them through ``vae``); save it to ``out``.

    Args:
        out: folder for ``model.safetensors`` and ``config.json``.
        vae: the toy-urban ``AutoencoderKL``; its round trip teaches the decoder's blur. ``None``: raw only.
        steps: optimizer steps (AdamW, cosine schedule).
        scenes: training scenes (seeds ``0 .. scenes - 1``, the diffusion model's own training scenes).
        batch: images per step.
        lr: peak learning rate.
        seed: seeds the weights and batches.
        threads: torch threads, set explicitly.
        balance: weight the loss by inverse square-root class frequency (clipped to 0.5-8), so thin
            rare classes (pole, bicycle) are predicted at all.
        log: called with one-line progress strings.

    Examples:
        >>> import tempfile
        >>> net = train_annotator(tempfile.mkdtemp(), steps=1, scenes=8, batch=2, log=lambda s: None)
        >>> isinstance(net, SegNet)
        True
    """
    from safetensors.torch import save_file

    torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, targets = _scenes(range(scenes))
    if vae is not None:
        half = scenes // 2
        images = torch.cat([images, _roundtrip(vae, images[:half])])  # raw scenes + decoder-blurred copies
        targets = torch.cat([targets, targets[:half]])
    counts = torch.bincount(targets.flatten(), minlength=len(SEG_LABELS)).float() + 1.0  # (C,)
    freq = counts / counts.sum()
    weights = (freq.median() / freq).sqrt().clamp(0.5, 8.0) if balance else torch.ones_like(freq)  # (C,)
    net = SegNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    started = time.perf_counter()
    net.train()
    for step in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, len(images), (batch,), generator=gen)
        x, y = images[idx], targets[idx]  # (B, 3, 64, 64), (B, 64, 64)
        flip = torch.rand(batch, generator=gen) < 0.5  # mirror half: the world has no left or right
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.where(flip.view(-1, 1, 1), y.flip(-1), y)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = F.cross_entropy(net(x), y, weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(json.dumps({"phase": "annotator", "step": step, "loss": round(float(loss.detach()), 4),
                            "wall_s": round(time.perf_counter() - started, 1)}))
    net.eval()
    tmp = out / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**net.config, "labels": list(SEG_LABELS), "steps": steps,
                                                 "scenes": scenes, "batch": batch, "lr": lr, "seed": seed,
                                                 "vae_roundtrip": vae is not None, "balance": balance,
                                                 "class_weights": [round(float(w), 3) for w in weights]},
                                                indent=1))
    return net


def load_annotator(path: str | Path | None = None) -> SegNet:
    """The trained segmentation net (the bundled one by default).

    Examples:
        >>> load_annotator("/nonexistent")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: ...
    """
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else ANNOTATOR_DIR
    if not (folder / "model.safetensors").exists():
        raise FileNotFoundError(f"no trained annotator at {folder} (model.safetensors missing)")
    config = json.loads((folder / "config.json").read_text())
    net = SegNet(width=config["width"], classes=config["classes"])
    net.load_state_dict(load_file(str(folder / "model.safetensors")))
    return net.eval()


@torch.no_grad()
def evaluate_annotator(net: SegNet, seeds, vae=None) -> dict[str, float]:
    """Per-class IoU of the net on rendered scenes (through ``vae`` if given), plus ``"mIoU"``.

    Examples:
        >>> scores = evaluate_annotator(SegNet(), range(HELD_OUT_ANNOTATOR, HELD_OUT_ANNOTATOR + 2))
        >>> "mIoU" in scores and all(0.0 <= v <= 1.0 for v in scores.values())
        True
    """
    images, targets = _scenes(seeds)
    if vae is not None:
        images = _roundtrip(vae, images)
    pred = torch.cat([net(images[i:i + 64]).argmax(1) for i in range(0, len(images), 64)])  # (N, 64, 64)
    result = {}
    for k, name in enumerate(SEG_LABELS):
        inter = ((pred == k) & (targets == k)).sum().item()
        union = ((pred == k) | (targets == k)).sum().item()
        if union:
            result[name] = inter / union
    result["mIoU"] = float(np.mean(list(result.values())))
    return result


def img2img_scene(pipe, seed: int, cls: str | None = None, strength: float = 0.5, prompt: str | None = None,
                  num_inference_steps: int = 20, guidance_scale: float = 5.0, generator_seed: int = 0):
    """Redraw the rendered scene of ``seed`` with an img2img pipeline; its label map is the ground truth.

    Args:
        pipe: a ``StableDiffusionImg2ImgPipeline`` (``load_pipeline("toy-urban", img2img=True)``).
        seed: scene seed (use held-out seeds, e.g. from 10**6, for evaluation).
        cls: force the main object's class.
        strength: how much of the diffusion is redone; the layout (and so the mask) holds up to ~0.6.
        prompt: defaults to the template caption of the scene's class.
        num_inference_steps: scheduler steps before ``strength`` is applied.
        guidance_scale: classifier-free guidance.
        generator_seed: seeds the noise.

    Returns:
        ``(image, labels, scene)``: the generated PIL image, the exact Cityscapes label map (H, W), the scene.

    Examples:
        >>> from opendaam.models import load_pipeline
        >>> pipe = load_pipeline("toy-urban", img2img=True)  # doctest: +SKIP
        >>> image, labels, scene = img2img_scene(pipe, 10**6, cls="car")  # doctest: +SKIP
    """
    scene = render_scene(seed, cls=cls)
    result = pipe(prompt=prompt if prompt is not None else template_caption(scene.cls), image=scene.pil(),
                  strength=strength, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                  generator=torch.Generator().manual_seed(generator_seed))
    return result.images[0], scene.labels.copy(), scene
