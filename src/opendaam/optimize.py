"""Token optimization: find the text embedding whose map matches an object's masks (thesis section 3.3).

``optimize_token(records, masks)`` runs gradient descent on one embedding x (``method="linear"``: the map is
``M x``, so an epoch is one matrix-vector product per image) or on a multi-token X' = [object, background]
(``method="open_vocab"``: softmax maps from the query cache), so that the min-max normalized maps match
ground-truth masks over N images. The optimized token then maps the object on new images of the same model:
``heatmaps(record, token, method="linear")``.

By default the loss is the thresholded metric's own decision: a logistic loss of ``normalized map - tau`` at
the masks' size, its slope rising from 100 to 10000 (towards the widest margin), the threshold learned for
half the epochs and then fixed on the evaluation grid, from a least-squares start, with a cosine learning
rate; masks made by thresholding a known token's map are recovered (planted-solution tests).

Fifth layer of opendaam: imports attention, tracing, cache, heatmaps and the pure functions of metrics (and the
private kernel loader ``_kernels``, which imports nothing of opendaam) only.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from opendaam import _kernels
from opendaam._io import atomic_write_with
from opendaam.attention import key_weight, text_keys, upsample
from opendaam.cache import queries
from opendaam.heatmaps import _key_modules, _to_latent, encode_text, find_tokens
from opendaam.metrics import confusion, default_thresholds, iou_score, normalize_maps
from opendaam.tracing import Record, adapter_for, store_queries
from opendaam.tracing.adapters import UNetCrossAttention, clip_encoders, encode_clip_ids

__all__ = [
    "LOSSES",
    "OptimizeConfig",
    "OptimizedToken",
    "load_token",
    "nearest_words",
    "optimize_token",
]


@dataclass(frozen=True)
class OptimizeConfig:
    """How :func:`optimize_token` optimizes.

    The defaults suit a few real masks (the thesis: 1 to 5 images per class), where a token that generalizes
    matters more than the training optimum. :meth:`fit_masks` gives the options that reach the optimum of the
    training masks when one exists (planted solutions: train IoU >= 0.99, held-out >= 0.93), which overfit
    one or two real masks (docs/optimize.md has both measured).
    """

    method: str = "linear"  # linear maps make an epoch one mat-vec per image; "open_vocab" uses softmax maps
    loss: str = "bce"  # best thesis test mIoU with 1-5 masks; fit_masks() takes "margin", the metric's decision
    sharpness: float = 100.0  # margin loss: slope of the sigmoid around the threshold at the first epoch
    sharpness_end: float = 10000.0  # ... rising geometrically to this: the loss tends to the widest margin
    lr: float = 0.05  # Adam step; with bce, larger steps overshot on toy-urban (0.3 lost 4-8 points)
    schedule: str = "constant"  # "cosine" (fit_masks) takes the learning rate to 0 at the last epoch
    epochs: int = 300  # enough for bce on toy-urban; fit_masks() needs 2000 (300 reached held-out 0.81)
    patience: int = 0  # stop after this many epochs without a better train IoU; 0 runs every epoch
    min_delta: float = 1e-5  # smaller train IoU improvements do not reset the patience counter
    size: str = "latent"  # compare at latent size: 64x fewer pixels in SD; fit_masks() compares at the masks'
    tau: float = 0.5  # the margin loss' starting threshold (normalized map) and the callback's train mIoU
    learn_tau: bool = False  # fit_masks() learns the threshold for the first half, then fixes it on the grid
    tau_step: float = 0.05  # that grid (metrics.default_thresholds), where the max-over-thresholds IoU is read
    start: str = "init"  # the init word; "fit": least-squares fit of the masks (scaled to the init word's norm)
    seed: int = 0  # seeds the background token's initialization (open_vocab, start="init")
    progress: bool = True  # show a progress bar
    queries: str = "auto"  # open_vocab: int8 caches run int8 kernels (half the bytes); "int8" quantizes others
    native: bool = True  # int8 caches: the fused C kernel (compiled at first use) when this machine can build it

    @classmethod
    def fit_masks(cls, **overrides) -> OptimizeConfig:
        """Options that reach the training masks' optimum when one exists: the margin loss at the masks' size
        with a rising slope, a learned threshold, a least-squares start, a cosine schedule over 2000 epochs.

        Examples:
            >>> cfg = OptimizeConfig.fit_masks(method="open_vocab")
            >>> cfg.loss, cfg.start, cfg.epochs, cfg.method
            ('margin', 'fit', 2000, 'open_vocab')
        """
        options = dict(loss="margin", lr=0.1, schedule="cosine", epochs=2000, size="image", learn_tau=True,
                       start="fit")
        return cls(**{**options, **overrides})

    def __post_init__(self):
        if self.method not in ("linear", "open_vocab"):
            raise ValueError(f"method must be 'linear' or 'open_vocab', not {self.method!r}")
        if self.size not in ("image", "latent"):
            raise ValueError(f"size must be 'image' or 'latent', not {self.size!r}")
        if self.queries not in ("auto", "bfloat16", "int8"):
            raise ValueError(f"queries must be 'auto', 'bfloat16' or 'int8', not {self.queries!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of: {', '.join(LOSSES)}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be 'cosine' or 'constant', not {self.schedule!r}")
        if self.start not in ("fit", "init"):
            raise ValueError(f"start must be 'fit' or 'init', not {self.start!r}")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"tau must be between 0 and 1 (exclusive), not {self.tau}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a whole number >= 1, not {self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, not {self.lr}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0 runs every epoch), not {self.patience}")


def _ce_loss(p: Tensor, g: Tensor) -> Tensor:
    """Thesis eq. 3.10, ``-sum G log p``, averaged over the mask's pixels, on normalized maps ``p``."""
    return -(g * torch.log(p + 1e-6)).sum(-1).div(g.sum(-1).clamp_min(1.0)).mean()


def _bce_loss(p: Tensor, g: Tensor) -> Tensor:
    """Binary cross-entropy of normalized maps against masks (both object and background pixels)."""
    return -(g * torch.log(p + 1e-6) + (1 - g) * torch.log(1 - p + 1e-6)).mean()


def _soft_iou_loss(p: Tensor, g: Tensor) -> Tensor:
    """One minus the soft IoU ``sum(p g) / sum(p + g - p g)``."""
    inter = (p * g).sum(-1)
    union = (p + g - p * g).sum(-1)
    return (1 - inter / union.clamp_min(1e-8)).mean()


def _margin_loss(p: Tensor, g: Tensor, tau: float = 0.5, sharpness: float = 100.0) -> Tensor:
    """Logistic loss of the mask decision ``p >= tau``: BCE of ``sigmoid(sharpness * (p - tau))``.

    A map family that can reproduce the mask at threshold ``tau`` reaches it exactly (it is logistic
    regression on the pixels), where plain BCE prefers step-like maps that may cross the threshold elsewhere.
    """
    return F.binary_cross_entropy_with_logits(sharpness * (p - tau), g)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": _ce_loss,
    "bce": _bce_loss,
    "soft_iou": _soft_iou_loss,
    "margin": _margin_loss,
}
"""Losses between normalized maps and masks, both ``(images, pixels)``."""


@dataclass
class OptimizedToken:
    """An optimized embedding: row 0 maps the object; further rows (open_vocab) are context tokens.

    Attributes:
        embedding: ``(tokens, text_dim)``; ``tokens`` is 1 for linear, 2 (object, background) for open_vocab.
        label: the class name, used as the map's label.
        meta: provenance: model, revision, text width, method, init word, loss, epochs, training images.
        history: per-epoch loss and train mIoU.
    """

    embedding: Tensor
    label: str = "token"
    meta: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def save(self, path: str | Path) -> Path:
        """Write the token as safetensors (metadata as JSON inside), atomically."""
        from safetensors.torch import save_file

        header = {"label": self.label, "meta": self.meta, "history": self.history}
        tensors = {"embedding": self.embedding.detach().float().contiguous()}
        return atomic_write_with(
            path, lambda tmp: save_file(tensors, str(tmp), metadata={"opendaam_token": json.dumps(header)})
        )


def load_token(path: str | Path, pipe=None, record: Record | None = None) -> OptimizedToken:
    """Load a token saved by :meth:`OptimizedToken.save`, checking it fits ``pipe`` and/or ``record``.

    Raises:
        ValueError: the token was made for another model (text width or model id differ); says which.

    Examples:
        >>> import os, tempfile
        >>> tok = OptimizedToken(torch.zeros(1, 4), "car", {"text_dim": 4, "model": "m"})
        >>> load_token(tok.save(os.path.join(tempfile.mkdtemp(), "car.safetensors"))).label
        'car'
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no token file at {path}")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if "opendaam_token" not in metadata:
            raise ValueError(f"{path} is not an opendaam token file")
        header = json.loads(metadata["opendaam_token"])
        embedding = handle.get_tensor("embedding").clone()
    token = OptimizedToken(embedding, header["label"], header["meta"], header.get("history", []))
    problems = []
    dim = token.meta.get("text_dim")
    if pipe is not None:
        width = int(pipe.unet.config.cross_attention_dim)
        if dim is not None and dim != width:
            problems.append(f"text width {dim} (token) vs {width} (pipeline)")
        name = getattr(pipe, "name_or_path", None)
        if token.meta.get("model") and name and _model_key(token.meta["model"]) != _model_key(name):
            problems.append(f"model {token.meta['model']!r} (token) vs {name!r} (pipeline)")
    if record is not None:
        if dim is not None and record.meta.get("text_dim") not in (None, dim):
            problems.append(f"text width {dim} (token) vs {record.meta['text_dim']} (record)")
        if token.meta.get("model") and record.meta.get("model") and \
                _model_key(token.meta["model"]) != _model_key(record.meta["model"]):
            problems.append(f"model {token.meta['model']!r} (token) vs {record.meta['model']!r} (record)")
    if problems:
        raise ValueError(f"token {path.name} was optimized for another model: " + "; ".join(problems))
    return token


def _model_key(name: str) -> str:
    """A model id comparable across machines: the folder's last part or the hub id."""
    return Path(str(name).rstrip("/")).name


def _mask_tensor(mask, record: Record, index: int, size: str = "latent") -> Tensor:
    """A flat float target at ``size`` (image: nearest-upsampled; latent: area-averaged) from a mask at
    image or latent size.

    A mask is bool, 0/1, soft in [0, 1] or 0/255 (a PNG); anything else (NaN, negative values, label ids such
    as {0, 3}) is refused, since scaling it would train on a wrong target.
    """
    m = torch.as_tensor(np.asarray(mask)).float()
    if m.ndim == 3:
        m = m[..., 0] if m.shape[-1] in (1, 3, 4) else m[0]
    if not torch.isfinite(m).all():
        raise ValueError(f"mask {index} has NaN or infinite values: give 0/1, [0, 1] or 0/255 masks")
    if m.numel() and m.min() < 0:
        raise ValueError(f"mask {index} has negative values (min {float(m.min())}): give 0/1, [0, 1] or 0/255 masks")
    if m.numel() and m.max() > 1:
        values = torch.unique(m)
        if not set(values.tolist()) <= {0.0, 255.0}:
            raise ValueError(
                f"mask {index} has values {values[:6].tolist()}: masks are 0/1, [0, 1] or 0/255; for a label map "
                "give (labels == class_id)")
        m = m / 255.0
    if tuple(m.shape) not in (tuple(record.image_size), tuple(record.latent_size)):
        raise ValueError(
            f"mask {index} is {tuple(m.shape)} but record {index} is {tuple(record.image_size)} (image) / "
            f"{tuple(record.latent_size)} (latent): resize the mask to one of them"
        )
    if m.sum() == 0:
        raise ValueError(f"mask {index} is empty: the object must cover at least one pixel")
    if size == "latent" and tuple(m.shape) != tuple(record.latent_size):
        m = F.adaptive_avg_pool2d(m[None, None], record.latent_size)[0, 0]  # (h, w) area fractions
    if size == "image" and tuple(m.shape) != tuple(record.image_size):
        m = F.interpolate(m[None, None], size=record.image_size, mode="nearest")[0, 0]  # (H, W)
    return m.flatten()


def _check_same_model(records: Sequence[Record]) -> None:
    """Raise if the records come from different models."""
    first = records[0]
    for i, r in enumerate(records[1:], start=1):
        same = (r.meta.get("model") == first.meta.get("model") and r.meta.get("text_dim") == first.meta.get(
            "text_dim") and list(r.layers) == list(first.layers))
        if not same:
            raise ValueError(
                f"records 0 and {i} come from different models ({first.meta.get('model')!r} vs "
                f"{r.meta.get('model')!r}); optimize over records of one model"
            )


def _init_embedding(init, records: Sequence[Record], pipe) -> Tensor:
    """The starting embedding ``(text_dim,)`` from a tensor, a word in the records' prompts, or a word."""
    if isinstance(init, Tensor):
        if not torch.isfinite(init).all():
            raise ValueError("the init tensor has NaN or infinite values: start from a word or a finite embedding")
        return init.detach().float().flatten().clone()
    for r in records:
        if r.tokens and r.context is not None:
            try:
                return r.context[find_tokens(r.tokens, init)].float().mean(0).clone()
            except KeyError:
                continue
    if pipe is None:
        raise ValueError(f"the init word {init!r} is in no record's prompt: pass pipe= to encode it")
    states, tokens = encode_text(pipe, init)
    return states[find_tokens(tokens, init)].mean(0).clone()


def _schedule(cfg: OptimizeConfig, epoch: int) -> tuple[float, float]:
    """Learning rate (cosine to 0, or constant) and margin sharpness (geometric ramp) at ``epoch``."""
    frac = epoch / max(1, cfg.epochs - 1)
    lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * epoch / cfg.epochs)) if cfg.schedule == "cosine" else cfg.lr
    return lr, cfg.sharpness * (cfg.sharpness_end / cfg.sharpness) ** frac


def _fit_direction(records: Sequence[Record], masks: Sequence) -> Tensor | None:
    """Unit direction x of least squares ``M_j x ~ mask_j`` (both centered per image, latent size, a ridge of
    1e-3 of the mean eigenvalue): the closed-form start; ``None`` when a record has no linear map.

    The map's offset per image is free (centering), its scale too (min-max normalized maps do not see it),
    so only the direction is kept. The linear map is also the open-vocabulary map's first-order term (the
    sigmoid's slope at 0), so the same direction starts the object-minus-background difference there.
    """
    if any(r.linear_map is None for r in records):
        return None
    gram, rhs = 0.0, 0.0
    for i, (m, r) in enumerate(zip(masks, records, strict=True)):
        a = r.linear_map.float()
        a = a - a.mean(0)  # (P, D)
        y = _mask_tensor(m, r, i, "latent")
        gram = gram + a.T @ a
        rhs = rhs + a.T @ (y - y.mean())
    ridge = 1e-3 * gram.diagonal().mean().clamp_min(1e-12)
    x = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), rhs)
    norm = x.norm()
    return x / norm if norm > 0 else None


@torch.no_grad()
def _step_size(objective, resize, x0: Tensor, delta: Tensor, targets: Tensor, kind: str,
               cfg: OptimizeConfig) -> Tensor:
    """The multiple of ``delta`` (object minus background) with the lowest starting margin loss: the
    sigmoids saturate, so the linear fit gives the direction but not the length."""
    best = None
    for factor in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0):
        maps = resize(objective(torch.stack([x0, x0 - factor * delta])))[:, 0]  # (N, P)
        loss = float(_margin_loss(normalize_maps(maps, kind, dims=1, eps=1e-8), targets, cfg.tau, cfg.sharpness))
        if best is None or loss < best[0]:
            best = (loss, factor)
    return best[1] * delta


class _Adam:
    """Adam (Kingma & Ba; torch.optim.Adam's defaults and update, step for step) for the one embedding tensor:
    six in-place tensor operations a step, where torch's optimizer spends about 0.2 ms of bookkeeping, a
    tenth of a linear epoch at SD 2 size."""

    def __init__(self, x: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.x, self.lr, self.betas, self.eps, self.t = x, lr, betas, eps, 0
        self.m, self.v = torch.zeros_like(x), torch.zeros_like(x)  # first and second moments

    def zero_grad(self) -> None:
        """Drop the gradient (as ``set_to_none=True``)."""
        self.x.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update from ``x.grad``."""
        b1, b2 = self.betas
        g = self.x.grad
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        self.x.addcdiv_(self.m, denom, value=-self.lr / (1 - b1**self.t))


class _LinearObjective:
    """Maps of one embedding on N images: ``M_j x + c_j`` stacked into one batched product."""

    def __init__(self, records: Sequence[Record]):
        missing = [i for i, r in enumerate(records) if r.linear_map is None]
        if missing:
            raise ValueError(f"records {missing} have no linear map M: trace with linear=True")
        self.m = torch.stack([r.linear_map.float() for r in records])  # (N, P, D)
        biases = [r.linear_bias if r.linear_bias is not None else torch.zeros(r.linear_map.shape[0])
                  for r in records]
        self.bias = torch.stack(biases).float()  # (N, P)

    def __call__(self, x: Tensor) -> Tensor:
        return torch.matmul(self.m, x[0]) + self.bias  # (N, P): one map per image for the object row


@functools.cache
def _int8_kernel_ok() -> bool:
    """Whether torch's int8-weight matmul (``aten._weight_int8pack_mm``, a private op) exists and agrees
    with a float product here; it returned garbage for bfloat16 inputs whose inner size was not a multiple of
    16 and crashed for size 3, so inputs are padded to 16 and this check runs once before first use."""
    op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
    if op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    try:
        for rows, inner in ((37, 16), (8, 64), (130, 32)):
            a = torch.randn(1, inner, generator=gen).to(torch.bfloat16)
            b = torch.randint(-127, 128, (rows, inner), generator=gen, dtype=torch.int8)
            scales = (torch.rand(rows, generator=gen) + 0.5).to(torch.bfloat16)
            got = op(a, b, scales).float()  # (1, rows)
            want = a.float() @ (b.float() * scales.float()[:, None]).T
            if got.shape != want.shape or not bool(((got - want).abs().max() <= 2e-2 * want.abs().max()).item()):
                return False
    except (RuntimeError, NotImplementedError):
        return False
    return True


class _Int8Scores(torch.autograd.Function):
    """Scores ``(heads, R)`` of int8 query codes with per-row scales against one vector per head, and the
    vectors' gradient, both as int8-weight matmuls: half the bytes of a bfloat16 cache per pass."""

    @staticmethod
    def forward(ctx, v: Tensor, layer: _Int8Layer) -> Tensor:
        op = torch.ops.aten._weight_int8pack_mm
        heads, head_dim = v.shape
        vb = _kernels.pad16(v.detach().to(torch.bfloat16))  # (heads, d16)
        out = torch.cat([op(vb[h : h + 1], layer.codes[h], layer.scales[h]) for h in range(heads)])  # (heads, R)
        ctx.layer, ctx.head_dim = layer, head_dim
        return out.float()

    @staticmethod
    def backward(ctx, grad: Tensor):
        op = torch.ops.aten._weight_int8pack_mm
        layer = ctx.layer
        weighted = _kernels.pad16((grad * layer.scales_f).to(torch.bfloat16))  # (heads, R16)
        ones = layer.ones
        dv = torch.cat([op(weighted[h : h + 1], layer.codes_t[h], ones) for h in range(len(weighted))])
        return dv.float()[:, : ctx.head_dim], None  # (heads, head_dim)


class _StackedKeys(torch.autograd.Function):
    """``W @ delta`` for the stacked bfloat16 keys of all layers, with the gradient from a row-major copy of
    ``W^T``: both are matrix-vector products over contiguous rows, which torch runs 1.6x (forward) and 2x
    (gradient) faster on CPU than ``F.linear`` and its transposed backward (SD 2: 31 MB of keys)."""

    @staticmethod
    def forward(ctx, delta: Tensor, w: Tensor, w_t: Tensor) -> Tensor:
        ctx.w_t = w_t
        return (w @ delta.detach().to(w.dtype)).float()  # (sum inner,)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return (ctx.w_t @ grad.to(ctx.w_t.dtype)).float(), None, None  # (D,)


class _NativeInt8Maps(torch.autograd.Function):
    """Object maps of one record's layers, each summed over heads and steps, concatenated ``(sum N_l,)``, from
    int8 codes through opendaam's fused kernel, which also returns each map's Jacobian in the layer's vectors:
    the gradient is one small product per layer, so an epoch reads the codes once (and the kernel threads
    meet once for all layers)."""

    @staticmethod
    def forward(ctx, flat: Tensor, layers: list[_NativeLayer], shapes: list[tuple[int, int]]) -> Tensor:
        vs = [part.view(shape) for part, shape in zip(flat.split([h * d for h, d in shapes]), shapes, strict=True)]
        # one Jacobian buffer per layer, reused by the next epoch once this one's gradient has run
        free = [layer.free for layer in layers]
        for layer in layers:
            layer.free = None
        maps, jacs = _kernels.int8_maps([layer.packed for layer in layers], vs,
                                        None if any(j is None for j in free) else free)
        ctx.layers, ctx.shapes, ctx.jacs = layers, shapes, jacs  # jacs: (N_l, heads, d16) float16 each
        return torch.cat(maps)  # (sum N_l,)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        jacs = ctx.jacs
        if jacs is None:
            raise RuntimeError("the native kernel's Jacobians are released after one backward pass; "
                               "recompute the maps instead of retain_graph=True")
        grads = _kernels.jac_grads([layer.packed for layer in ctx.layers], jacs,
                                   list(grad.split([j.shape[0] for j in jacs])))  # (heads, d16) each
        for layer, jac in zip(ctx.layers, jacs, strict=True):
            layer.free = jac
        ctx.jacs = None
        return torch.cat([dv[:, :d].flatten() for dv, (_, d) in zip(grads, ctx.shapes, strict=True)]), None, None


@dataclass(frozen=True)
class _Int8Layer:
    """One layer's int8 codes for torch's int8-weight matmul, which also needs the transposed codes."""

    codes: Tensor  # (heads, R, d16) int8
    codes_t: Tensor  # (heads, d, R16) int8: the gradient's product
    scales: Tensor  # (heads, R) bfloat16, the forward's row scales
    scales_f: Tensor  # (heads, R) float32, weighting the gradient's rows
    ones: Tensor  # (head_dim,) bfloat16: the gradient's rows carry no scale


@dataclass
class _NativeLayer:
    """One layer's codes in the fused kernel's blocks, and the Jacobian buffer the next epoch reuses."""

    packed: _kernels.Packed
    free: Tensor | None = None  # set by a backward pass, taken by the next forward


class _Backend:
    """How object maps are computed from one record's cached queries: chosen once per objective.

    ``add`` stores a layer's queries (float ``(heads, R, head_dim)``, or int8 codes and their row scales
    ``(heads, R)`` when :attr:`quantized`), rows ordered (step, pixel); ``maps`` returns, per layer, the object
    map ``(pixels,)`` (the sum over heads and steps of ``sigmoid(q . v_h)``, differentiable in the vectors)
    and the number of steps it sums.
    """

    name = ""
    quantized = False  # whether add() takes int8 codes

    def __init__(self):
        self.layers: dict = {}
        self.pixels: dict[str, int] = {}

    def add(self, name: str, queries: Tensor, scales: Tensor | None, pixels: int) -> None:
        raise NotImplementedError

    def maps(self, vectors: dict[str, Tensor]) -> dict[str, tuple[Tensor, int]]:
        """Per layer ``(object map (pixels,), steps)`` for vectors ``(heads, head_dim)`` per layer."""
        return {name: self._layer_map(name, vectors[name]) for name in self.layers}

    def _layer_map(self, name: str, v: Tensor) -> tuple[Tensor, int]:
        score = self._scores(name, v)  # (heads, S*N)
        pixels = self.pixels[name]
        return torch.sigmoid(score).view(v.shape[0], -1, pixels).sum((0, 1)), score.shape[1] // pixels

    def _scores(self, name: str, v: Tensor) -> Tensor:
        raise NotImplementedError


class _FloatBackend(_Backend):
    """bfloat16 queries ``(heads, R, head_dim)``: one ``(R, d) @ (d, 1)`` product per head, forward and
    gradient 2.6x faster on CPU than a batched bmm (13 vs 35 ms for one 81 MB SD 2 layer)."""

    name = "bfloat16"

    def add(self, name: str, queries: Tensor, scales: Tensor | None, pixels: int) -> None:
        self.layers[name] = queries.to(torch.bfloat16).contiguous()
        self.pixels[name] = pixels

    def _scores(self, name: str, v: Tensor) -> Tensor:
        q = self.layers[name]
        vb = v.to(torch.bfloat16)
        return torch.stack([(q[h] @ vb[h, :, None])[:, 0] for h in range(v.shape[0])]).float()


class _TorchInt8Backend(_Backend):
    """int8 codes through torch's int8-weight matmul, forward and gradient (two passes over the codes)."""

    name = "torch int8"
    quantized = True

    def add(self, name: str, queries: Tensor, scales: Tensor | None, pixels: int) -> None:
        self.layers[name] = _Int8Layer(
            codes=_kernels.pad16(queries).contiguous(),
            codes_t=_kernels.pad16(queries.transpose(1, 2)).contiguous(),
            scales=scales.to(torch.bfloat16).contiguous(),
            scales_f=scales.float().contiguous(),
            ones=torch.ones(queries.shape[2], dtype=torch.bfloat16),
        )
        self.pixels[name] = pixels

    def _scores(self, name: str, v: Tensor) -> Tensor:
        return _Int8Scores.apply(v, self.layers[name])


class _NativeBackend(_Backend):
    """int8 codes through opendaam's fused C kernel (:mod:`opendaam._kernels`): scores, sigmoid, the sums over
    heads and steps and the map's Jacobian in one pass over the codes, all layers in one dispatch."""

    name = "native"
    quantized = True

    def add(self, name: str, queries: Tensor, scales: Tensor | None, pixels: int) -> None:
        rows = queries.shape[1]  # blocks of 16 pixels, each block's rows of all steps contiguous
        self.layers[name] = _NativeLayer(_kernels.pack(queries, scales, rows // pixels, pixels))
        self.pixels[name] = pixels

    def maps(self, vectors: dict[str, Tensor]) -> dict[str, tuple[Tensor, int]]:
        names = list(self.layers)
        flat = torch.cat([vectors[n].flatten() for n in names])  # (sum heads * head_dim,)
        joined = _NativeInt8Maps.apply(flat, [self.layers[n] for n in names], [tuple(vectors[n].shape) for n in names])
        parts = joined.split([self.pixels[n] for n in names])
        return {n: (part, self.layers[n].packed.codes.shape[2])  # codes: (heads, blocks, steps, 16, d16)
                for n, part in zip(names, parts, strict=True)}


def _choose_backend(records: Sequence[Record], queries_as: str, native: bool) -> type[_Backend]:
    """The backend of an objective: int8 for ``queries="int8"``, or ``"auto"`` when every record's cache is
    int8 (the fused kernel where it builds and ``native``, else torch's int8 matmul); bfloat16 otherwise."""
    int8 = queries_as == "int8" or (queries_as == "auto" and all(bool(r.query_scales) for r in records))
    if not int8:
        return _FloatBackend
    if native and _kernels.available():
        return _NativeBackend
    if _int8_kernel_ok():
        return _TorchInt8Backend
    if queries_as == "int8":
        raise RuntimeError("queries='int8' needs opendaam's native kernels or torch's int8-weight "
                           "matmul, and neither works here; use queries='bfloat16'")
    return _FloatBackend


class _OpenVocabObjective:
    """Softmax maps of X' = [object, background] on N images from their query caches.

    With two tokens the softmax is a sigmoid of the score difference, so each layer needs one product of
    the cached queries with ``W_k (x_obj - x_bg)`` per head; queries are laid out ``(heads, steps * N,
    head_dim)`` once, in one :class:`_Backend` per record (the same kind for all): bfloat16, or int8 codes
    (half the bytes; the record's own codes, or ``queries="int8"`` quantizes a float cache with one scale per
    head, step and pixel, as ``trace(query_dtype="int8")``) through the fused native kernel or torch's
    int8-weight matmuls.
    """

    def __init__(self, records: Sequence[Record], pipe, queries_as: str = "auto", native: bool = True):
        if pipe is None:
            raise ValueError("open_vocab optimization needs the pipeline's attention keys: pass pipe=...")
        missing = [i for i, r in enumerate(records) if not r.queries]
        if missing:
            raise ValueError(f"open_vocab optimization needs records traced with queries=True (not records {missing})")
        self.records = records
        self.modules = _key_modules(pipe, records[0], list(records[0].layers))
        self.backend = _choose_backend(records, queries_as, native)
        self.backends: list[_Backend] = []
        for r in records:
            backend = self.backend()
            for name, info in r.layers.items():
                if backend.quantized and name in r.query_scales:  # the record's own codes: no further rounding
                    codes = r.queries[name].transpose(0, 1).reshape(info.heads, -1, info.head_dim)  # (heads, S*N, d)
                    scales = r.query_scales[name].transpose(0, 1).reshape(info.heads, -1)  # (heads, S*N)
                    backend.add(name, codes, scales, info.pixels)
                    continue
                q = queries(r, name).transpose(0, 1).reshape(info.heads, -1, info.head_dim)  # (heads, S*N, d)
                # int8: the tracer's own storage (absmax codes, one fp16 scale per head, step and pixel)
                backend.add(name, *(store_queries(q, "int8") if backend.quantized else (q, None)), info.pixels)
            self.backends.append(backend)
        # Only W_k (x_obj - x_bg) enters the scores (a key bias cancels): with linear keys, all layers' scaled
        # W_k stacked in bfloat16 (the precision v is streamed in) make the vectors of an epoch one product.
        first = records[0].layers
        self.stacked = None
        if not any(m.norm_cross or m.norm_k is not None for m in self.modules.values()):
            self.stacked = torch.cat([key_weight(self.modules[n])[0] * info.scale
                                      for n, info in first.items()]).to(torch.bfloat16)  # (sum inner, D)
            self.stacked_t = self.stacked.T.contiguous()  # (D, sum inner): the gradient's product, row-major
            self.splits = [info.heads * info.head_dim for info in first.values()]

    def _vectors(self, x: Tensor) -> dict[str, Tensor]:
        """Per layer ``(heads, head_dim)``: the scaled key difference of the object and background rows."""
        layers = self.records[0].layers
        if self.stacked is not None:
            flat = _StackedKeys.apply(x[0] - x[1], self.stacked, self.stacked_t)  # (sum inner,)
            return {n: part.view(info.heads, info.head_dim)
                    for (n, info), part in zip(layers.items(), flat.split(self.splits), strict=True)}
        vectors = {}
        for name, info in layers.items():
            k = text_keys(self.modules[name], x)  # (heads, 2, head_dim)
            vectors[name] = (k[:, 0] - k[:, 1]) * info.scale  # (heads, head_dim)
        return vectors

    def __call__(self, x: Tensor) -> Tensor:
        maps = []
        vectors = self._vectors(x)
        for r, backend in zip(self.records, self.backends, strict=True):
            by_size: dict[tuple[int, int], str] = {}  # (h_l, w_l) -> the first layer of that size
            summed: dict[str, Tensor] = {}  # that layer -> (1, N_l) object maps of all layers of its size
            total = 0.0  # heads x steps over all layers: the object and background maps add up to it
            objs = backend.maps(vectors)
            for name, info in r.layers.items():
                obj, steps = objs[name]  # (N,)
                first = by_size.setdefault((info.height, info.width), name)
                summed[first] = obj[None] if first not in summed else summed[first] + obj
                total += float(info.heads * steps)
            # interpolation is linear: each size is interpolated once, after its layers are summed; it also keeps
            # constants, so the background's map is the total minus the object's
            obj = _to_latent(summed, r).flatten()  # (P,)
            maps.append(torch.stack([obj, total - obj]))  # (2, P): object, background
        return torch.stack(maps)  # (N, 2, P)


class _ReplayObjective:
    """Joint attention (SD3, Flux): maps of X' = [object, background] from its own text stream, replayed beside
    each generation's frozen image stream (:func:`opendaam.replay.token_maps`), differentiable in X'."""

    def __init__(self, records: Sequence[Record], pipe):
        if pipe is None:
            raise ValueError("open_vocab optimization in joint attention replays the generation: pass pipe=...")
        self.records, self.pipe = records, pipe

    def __call__(self, x: Tensor) -> Tensor:
        from opendaam.replay import token_maps

        return torch.stack([token_maps(r, self.pipe, x) for r in self.records])  # (N, 2, P)


def optimize_token(
    records: Sequence[Record],
    masks: Sequence,
    *,
    pipe=None,
    init: str | Tensor = "car",
    label: str | None = None,
    config: OptimizeConfig | None = None,
    callback: Callable[[dict], None] | None = None,
    image_ids: Sequence[str] | None = None,
    **options,
) -> OptimizedToken:
    """Optimize a text embedding so that its normalized maps match ``masks`` on ``records``.

    Args:
        records: N records of one model (linear needs ``M``; open_vocab the query cache).
        masks: N binary masks at the records' image or latent size (0/1, bool or 0/255).
        pipe: the pipeline, needed for open_vocab and to encode an init word not in the prompts.
        init: starting point: a word (its embedding in a record's prompt, else encoded alone) or a tensor.
        label: the class name stored with the token (default: the init word).
        config: :class:`OptimizeConfig`; keyword ``options`` override its fields (``lr=``, ``epochs=``...).
        callback: called after every epoch with ``{"epoch", "loss", "train_miou", "train_max_miou", "tau"}``
            (train mIoU at the current threshold, and the best over the threshold grid).
        image_ids: names of the training images, stored in the token's metadata.

    Returns:
        The :class:`OptimizedToken` of the epoch with the best max-over-thresholds train mIoU (the latest
        of equals); its meta holds that IoU (``train_max_miou``), the threshold (``tau``) and the loss.

    Examples:
        >>> from opendaam.tracing import Record, upsample
        >>> m = torch.zeros(4, 2); m[:2, 0] = 1.0; m[2:, 1] = 1.0   # pixels 0-1 follow x[0], 2-3 follow x[1]
        >>> r = Record(meta={"latent_size": [2, 2], "image_size": [2, 2], "text_dim": 2}, linear_map=m)
        >>> tok = optimize_token([r], [np.array([[1, 1], [0, 0]])], init=torch.zeros(2), progress=False)
        >>> bool(tok.embedding[0, 0] > tok.embedding[0, 1]), tok.history[-1]["train_miou"]
        (True, 1.0)
    """
    from dataclasses import replace

    cfg = replace(config or OptimizeConfig(), **options)
    records = list(records)
    if not records:
        raise ValueError("no records to optimize on")
    if len(masks) != len(records):
        raise ValueError(f"{len(records)} records but {len(masks)} masks: give one mask per record")
    _check_same_model(records)
    sizes = {(tuple(r.latent_size), tuple(r.image_size)) for r in records}
    if len(sizes) > 1:
        raise ValueError(f"records have different sizes {sorted(sizes)}; optimize per size")
    targets = torch.stack([_mask_tensor(m, r, i, cfg.size)
                           for i, (m, r) in enumerate(zip(masks, records, strict=True))])  # (N, pixels)
    mode = records[0].meta.get("trace_config", {}).get("upsample", "bicubic")
    h, w = records[0].latent_size
    image_size = tuple(records[0].image_size)

    def resize(maps: Tensor) -> Tensor:
        """Latent ``(..., h*w)`` maps as flat maps at the loss' size."""
        if cfg.size == "latent":
            return maps
        grid = maps.reshape(*maps.shape[:-1], h, w)
        return upsample(grid, image_size, mode).flatten(-2)  # (..., H*W)

    loss_fn = LOSSES[cfg.loss]
    margin = cfg.loss == "margin"
    # min-max normalized maps for both methods: open-vocabulary maps divided by their maximum alone stayed
    # above 0.5 everywhere on toy-urban (a large constant part), so no threshold there could cut a mask
    kind = "minmax"
    x0 = _init_embedding(init, records, pipe)
    direction = _fit_direction(records, masks) if cfg.start == "fit" else None
    if cfg.method == "linear":
        objective = _LinearObjective(records)
        rows = [x0 if direction is None else direction * x0.norm()]
    else:
        objective = _ReplayObjective(records, pipe) if records[0].replay else _OpenVocabObjective(
            records, pipe, cfg.queries, cfg.native)
        if direction is None:
            gen = torch.Generator().manual_seed(cfg.seed)
            rows = [x0, torch.randn(x0.shape, generator=gen) * x0.std()]  # object, background
        else:
            rows = [x0, x0 - _step_size(objective, resize, x0, direction * x0.norm(), targets, kind, cfg)]
    x = torch.nn.Parameter(torch.stack(rows))  # (tokens, D)
    optimizer = _Adam(x, cfg.lr)
    tau = torch.tensor([math.log(cfg.tau / (1 - cfg.tau))], requires_grad=margin and cfg.learn_tau)  # logit
    tau_optimizer = _Adam(tau, cfg.lr)
    binary = targets >= 0.5
    grid = default_thresholds(cfg.tau_step)[1:-1]  # (T,): 0 and 1 give all and (nearly) no pixels

    best = (-1.0, x.detach().clone(), -1, math.inf, cfg.tau)  # train IoU, embedding, epoch, loss, threshold
    history = []
    since_best = 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, desc=f"optimize {label or init if isinstance(init, str) else 'token'}")
    for epoch in range(cfg.epochs):
        lr, sharpness = _schedule(cfg, epoch)
        optimizer.lr = tau_optimizer.lr = lr
        if tau.requires_grad and epoch == cfg.epochs // 2:  # from here on the threshold is a grid value
            with torch.no_grad():
                fixed = float(grid[(grid - torch.sigmoid(tau)).abs().argmin()])
                tau.fill_(math.log(fixed / (1 - fixed)))
            tau.requires_grad_(False)
        optimizer.zero_grad()
        tau_optimizer.zero_grad()
        maps = resize(objective(x))
        threshold = torch.sigmoid(tau)[0]
        if cfg.method == "linear":
            obj = normalize_maps(maps, kind, dims=1, eps=1e-8)  # (N, P)
            loss = _margin_loss(obj, targets, threshold, sharpness) if margin else loss_fn(obj, targets)
        elif margin:
            obj = normalize_maps(maps[:, 0], kind, dims=1, eps=1e-8)  # (N, P); background = total - object
            loss = _margin_loss(obj, targets, threshold, sharpness)
        else:
            p = normalize_maps(maps, "minmax", dims=1, eps=1e-8)  # (N, 2, P)
            g = torch.stack([targets, 1 - targets], dim=1)  # (N, 2, P)
            loss = loss_fn(p.flatten(0, 1), g.flatten(0, 1))
            obj = p[:, 0]
        value = float(loss.detach())
        pred = obj.detach()
        now = float(threshold.detach())
        miou = float(iou_score(confusion((pred >= now)[:, None], binary[:, None]), empty=0.0).mean())
        above = (pred >= grid[:, None, None])[:, :, None]  # (T, N, 1, P): every threshold, pixels as 1 x P maps
        stats = confusion(above, binary[:, None].expand_as(above))  # (T, N, 4)
        top = float(iou_score(stats, empty=0.0).mean(1).max())  # the max-over-thresholds mIoU evaluation reads
        if top >= best[0]:  # ties go to the later epoch: same masks, wider margin
            since_best = 0 if top > best[0] + cfg.min_delta else since_best + 1
            best = (top, x.detach().clone(), epoch, value, now)  # the embedding these maps were computed with
        else:
            since_best += 1
        loss.backward()
        optimizer.step()
        if tau.requires_grad:
            tau_optimizer.step()
        entry = {"epoch": epoch, "loss": value, "train_miou": miou, "train_max_miou": top, "tau": now}
        history.append(entry)
        if callback is not None:
            callback(entry)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", miou=f"{top:.3f}")
        if cfg.patience and since_best >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    best_iou, best_x, best_epoch, best_loss, best_tau = best
    text_dim = int(records[0].meta.get("text_dim") or x.shape[1])
    meta = {
        "model": records[0].meta.get("model"), "revision": records[0].meta.get("revision"), "text_dim": text_dim,
        "method": cfg.method, "label": label or (init if isinstance(init, str) else "token"),
        "init": init if isinstance(init, str) else "tensor", "loss_name": cfg.loss, "loss": best_loss,
        "train_max_miou": best_iou, "tau": best_tau, "best_epoch": best_epoch, "epochs_run": len(history),
        "config": asdict(cfg),
        "train_images": list(image_ids) if image_ids is not None else [r.meta.get("index") for r in records],
    }
    return OptimizedToken(best_x, label=meta["label"], meta=meta, history=history)


def nearest_words(token: OptimizedToken | Tensor, pipe, k: int = 10, vocabulary: Sequence[str] | None = None,
                  batch: int = 512) -> list[tuple[str, float]]:
    """Words whose single-word embeddings are nearest (cosine) to a token: the mask-to-text direction.

    With CLIP (Stable Diffusion, SDXL) each word is encoded as ``<start> word`` (the text encoder is causal, so
    its output at the word does not depend on what follows); with T5 (PixArt) as the word alone, through the
    caption projection. ``vocabulary`` defaults to every whole-word token of the tokenizer.

    Returns:
        ``k`` (word, cosine similarity) pairs, most similar first.
    """
    x = token.embedding[0] if isinstance(token, OptimizedToken) else token.flatten()
    adapter = adapter_for(pipe)
    tokenizer = getattr(pipe, adapter.text_segments(pipe)[0])
    clip = adapter is UNetCrossAttention
    if vocabulary is None:
        vocab = tokenizer.get_vocab()
        whole = (lambda t: t.endswith("</w>") and t[:-4].isalpha()) if clip else (
            lambda t: t.startswith("\u2581") and t[1:].isalpha())  # CLIP marks a word's end, T5 its start
        ids = sorted(i for t, i in vocab.items() if whole(t))
    else:
        ids = []
        for word in vocabulary:
            piece = tokenizer(word, add_special_tokens=False).input_ids
            if len(piece) == 1:
                ids.append(piece[0])
    if not ids:
        raise ValueError("no single-token words to compare with")
    outs = []
    for i in range(0, len(ids), batch):
        part = ids[i : i + batch]
        if clip:
            chunk = torch.tensor([[tokenizer.bos_token_id, t] for t in part])  # (b, 2), the same in every encoder
            outs.append(encode_clip_ids(pipe, [chunk] * len(clip_encoders(pipe)))[:, 1])  # (b, D) the word's row
        else:
            words = [w.lstrip("\u2581") for w in tokenizer.convert_ids_to_tokens(part)]
            outs.append(adapter.encode(pipe, words, length=4).states[:, 0])  # (b, D) the word's first token
    emb = torch.cat(outs)
    sims = F.cosine_similarity(emb, x.float()[None], dim=-1)
    top = sims.topk(min(k, len(ids)))
    names = tokenizer.convert_ids_to_tokens([ids[i] for i in top.indices.tolist()])
    return [(n[:-4] if n.endswith("</w>") else n.lstrip("\u2581"), float(s))
            for n, s in zip(names, top.values.tolist(), strict=True)]
