"""Recorders: one class per thing a trace records, each with the same small interface.

The tracer computes a layer's queries once per batch of buffered steps (a :class:`LayerBatch`) and, when some
recorder needs them, the softmax probabilities over the text tokens a few steps at a time; each recorder takes
what it needs into per-image accumulators and writes its field of every image's :class:`Record` at the end.
Which recorders run is chosen by :class:`~opendaam.tracing.TraceConfig`'s flags (:func:`recorders_for`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opendaam.attention import key_weight, scores_bounded, token_softmax_, upsample
from opendaam.tracing.records import LayerInfo, Record, store_queries

__all__ = [
    "DaamPerStep",
    "DaamSums",
    "LayerBatch",
    "LinearMatrix",
    "QueryCache",
    "Recorder",
    "ReplayInputs",
    "TextContext",
    "build_linear_map",
    "probability_chunks",
]


@dataclass
class LayerBatch:
    """One layer's inputs for ``k`` recorded steps of the ``n`` conditional images."""

    name: str  # the layer's processor key
    attn: nn.Module  # the diffusers Attention module
    info: LayerInfo  # its geometry
    flat: Tensor  # (k, n, N, inner) to_q output
    q: Tensor  # (k, n, heads, N, head_dim) per-head queries after norm_q
    context: Tensor  # (n, T, text_dim) the conditional text states
    keys: Tensor  # (n, heads, T, head_dim) float32 keys times the layer's scale and log2(e)
    positions: list[int]  # the steps' rows in per-step buffers
    bias: Tensor | None = None  # (n, T) additive score bias in log2 units (PixArt's padding mask)
    image_keys: Tensor | None = None  # (n, heads, M, head_dim) joint attention's image keys, scaled as ``keys``


@dataclass(frozen=True)
class Finish:
    """What recorders may need to write a record's fields."""

    layers: dict[str, LayerInfo]  # geometry of the recorded layers, in model order
    modules: dict[str, nn.Module]  # their attention modules
    latent_size: tuple[int, int]  # (h, w) of the denoised latent
    steps: int  # recorded steps of the generation
    upsample: str  # interpolation from each layer to latent size


_SOFTMAX_FLOATS = 2**21
"""Probabilities computed at once per layer (8 MB of float32): steps are batched up to it, so that the
passes of the softmax run on cache-resident data (measured: faster than one pass over all steps for the
Stable Diffusion 2 layers at 256 px and for toy-urban, and than 2 MB pieces for the large layers)."""


def probability_chunks(batch: LayerBatch):
    """Yield ``(c, n, heads, T, N)`` softmax probabilities over the text tokens, a few steps at a time, in step
    order (token-major; the keys carry log2(e), so exp2 gives the same probabilities as exp). With image keys
    (joint attention, ``joint_slice``), the text columns of the softmax over image and text keys instead."""
    if batch.image_keys is not None:
        yield _joint_slice(batch)
        return
    qf = batch.q.float()
    k, n, heads, pixels, _ = qf.shape
    keys = batch.keys
    shift = not scores_bounded(qf, keys)  # else exp2 can neither overflow nor empty the sum unshifted
    chunk = max(1, _SOFTMAX_FLOATS // (n * heads * keys.shape[-2] * pixels))
    bias = None if batch.bias is None else batch.bias[:, None, :, None]  # (n, 1, T, 1)
    for i in range(0, k, chunk):
        scores = torch.matmul(keys, qf[i : i + chunk].transpose(-1, -2))  # (c, n, heads, T, N)
        if bias is not None:
            scores += bias  # masked tokens: exp2 of about -14427 is 0, as in the model's float32 softmax
        yield token_softmax_(scores, shift)


def _joint_slice(batch: LayerBatch) -> Tensor:
    """``(k, n, heads, T, N)``: the text columns of the joint softmax over image and text keys, one head at a time
    (the image-image scores of a head are the largest temporary)."""
    qf = batch.q.float()  # (k, n, heads, N, head_dim)
    text = torch.matmul(batch.keys, qf.transpose(-1, -2))  # (k, n, heads, T, N) log2 units
    if batch.bias is not None:
        text += batch.bias[:, None, :, None]
    ln2 = math.log(2)
    image = torch.stack([torch.logsumexp(torch.matmul(batch.image_keys[:, h], qf[:, :, h].transpose(-1, -2)) * ln2,
                                         dim=-2) for h in range(qf.shape[2])], dim=2)  # (k, n, heads, N) natural
    total = torch.logaddexp(torch.logsumexp(text * ln2, dim=-2), image)  # (k, n, heads, N): log of all the mass
    return torch.exp(text * ln2 - total[..., None, :])


class Recorder:
    """Fills one field of each generated image's record.

    Attributes:
        uses_probs: the recorder reads the softmax probabilities (:meth:`add_probs`).
    """

    uses_probs = False

    def __init__(self, device: str = "cpu"):
        self.device = device  # where recorded tensors are kept
        self.images: list[dict] = []

    def start(self, images: int, capacity: int) -> None:
        """Open per-image accumulators for a generation of ``images`` images and about ``capacity`` steps."""
        self.images = [{} for _ in range(images)]
        self.capacity = capacity

    def add_probs(self, batch: LayerBatch, probs: Tensor) -> None:
        """Take one chunk ``(c, n, heads, T, N)`` of the batch's probabilities (chunks come in step order)."""

    def add(self, batch: LayerBatch) -> None:
        """Take what is needed from one layer's batch (after all its probability chunks)."""

    def on_call(self, rows: slice, args: tuple, kwargs: dict) -> None:
        """Take what is needed from a recorded denoiser call (``rows``: its conditional batch rows)."""

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        """Write this recorder's field of image ``image``'s record."""
        raise NotImplementedError


class TextContext(Recorder):
    """The conditional text states ``(T, text_dim)`` the keys were computed from (always recorded)."""

    def add(self, batch: LayerBatch) -> None:
        for j, acc in enumerate(self.images):
            if "context" not in acc:
                acc["context"] = batch.context[j].detach().to(self.device, torch.float32, copy=True)  # (T, D)
                if batch.bias is not None:  # PixArt: which columns the padding mask let through
                    acc["mask"] = (batch.bias[j] > -1).int().tolist()

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        acc = self.images[image]
        record.context = acc.get("context")
        if acc.get("mask") is not None and not all(acc["mask"]):
            record.meta["text_mask"] = acc["mask"]


class DaamSums(Recorder):
    """DAAM: softmax probabilities summed over the recorded steps, per layer and head, ``(heads, N, T)``."""

    uses_probs = True

    def start(self, images: int, capacity: int) -> None:
        super().start(images, capacity)
        self.batch_sum: Tensor | None = None

    def add_probs(self, batch: LayerBatch, probs: Tensor) -> None:
        part = probs.sum(0)  # (n, heads, T, N), a new tensor: the per-step probabilities stay untouched
        self.batch_sum = part if self.batch_sum is None else self.batch_sum.add_(part)

    def add(self, batch: LayerBatch) -> None:
        for j, acc in enumerate(self.images):
            p = self.batch_sum[j].to(self.device)  # (heads, T, N)
            if batch.name in acc:
                acc[batch.name] += p
            else:
                acc[batch.name] = p.clone()
        self.batch_sum = None

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        # accumulated token-major: (heads, T, N) -> (heads, N, T)
        record.daam = {n: v.transpose(-1, -2).contiguous() for n, v in self.images[image].items()}


class DaamPerStep(Recorder):
    """Per-step DAAM probabilities ``(steps, heads, N, T)`` in float16 (opt-in: steps x the memory)."""

    uses_probs = True

    def add_probs(self, batch: LayerBatch, probs: Tensor) -> None:
        for j, acc in enumerate(self.images):
            acc.setdefault(batch.name, []).extend(probs[:, j].to(self.device, torch.float16).unbind(0))

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        record.daam_steps = {n: torch.stack(v).transpose(-1, -2).contiguous()
                             for n, v in self.images[image].items()}  # (steps, heads, N, T)


class QueryCache(Recorder):
    """The open-vocabulary query cache ``(steps, heads, N, head_dim)`` per layer, in its storage dtype (int8
    with per-head-and-pixel scales)."""

    def __init__(self, dtype: str, device: str = "cpu"):
        super().__init__(device)
        self.dtype = dtype  # storage dtype: float16, bfloat16, float32 or int8

    def add(self, batch: LayerBatch) -> None:
        for j, acc in enumerate(self.images):
            stored, scales = store_queries(batch.q[:, j], self.dtype)  # (k, heads, N, head_dim)
            codes = acc.setdefault("queries", {})
            scale_rows = acc.setdefault("scales", {})
            for i, position in enumerate(batch.positions):
                _put(codes, batch.name, position, stored[i], self.capacity, self.device)
                if scales is not None:
                    _put(scale_rows, batch.name, position, scales[i], self.capacity, self.device)

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        acc = self.images[image]
        record.queries = {n: _trim(v, finish.steps) for n, v in acc.get("queries", {}).items()}
        record.query_scales = {n: _trim(v, finish.steps) for n, v in acc.get("scales", {}).items()}


class LinearMatrix(Recorder):
    """Per-layer query sums over steps ``(N, inner)``, from which the linear map matrix M is built once at the
    end (``matrix``), and which are kept for layer or head selection of linear maps (``keep_sums``)."""

    def __init__(self, matrix: bool = True, keep_sums: bool = False, device: str = "cpu"):
        super().__init__(device)
        self.matrix = matrix  # build M (and its bias) into the record
        self.keep_sums = keep_sums  # also store the per-layer sums (~3x the bytes of M)

    def add(self, batch: LayerBatch) -> None:
        k, n, heads, pixels, _ = batch.q.shape
        inner = batch.flat.shape[-1]
        q_flat = batch.q.transpose(2, 3).reshape(k, n, pixels, inner) if batch.attn.norm_q is not None \
            else batch.flat
        q_sum = q_flat.float().sum(0) if k > 1 else q_flat[0].float()  # (n, N, inner)
        for j, acc in enumerate(self.images):
            qs = q_sum[j].to(self.device)  # (N, inner)
            if batch.name in acc:
                acc[batch.name] += qs
            else:
                acc[batch.name] = qs.clone()

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        sums = self.images[image]
        if self.matrix and sums:
            record.linear_map, record.linear_bias = build_linear_map(
                sums, finish.layers, finish.modules, finish.latent_size, finish.upsample)
        if self.keep_sums:
            record.query_sums = sums


class ReplayInputs(Recorder):
    """What the denoiser was called with at the recorded steps (the conditional row), so that a new text's
    stream can be run again beside the frozen image stream (:mod:`opendaam.replay`): the latent and timestep per
    step, and the call's constant conditioning once."""

    CONSTANT = ("pooled_projections", "guidance", "img_ids", "txt_ids")  # SD3 and Flux call arguments

    def on_call(self, rows: slice, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        timestep = kwargs.get("timestep")
        batch = hidden.shape[0]
        for j, acc in enumerate(self.images):
            row = rows.start + j
            acc.setdefault("hidden_states", []).append(hidden[row].detach().to(self.device, copy=True))
            t = timestep[row] if isinstance(timestep, Tensor) and timestep.ndim else torch.as_tensor(timestep)
            acc.setdefault("timestep", []).append(t.detach().to(self.device, torch.float32, copy=True))
            for key in self.CONSTANT:
                value = kwargs.get(key)
                if key not in acc and isinstance(value, Tensor):
                    batched = value.ndim and value.shape[0] == batch and not key.endswith("_ids")  # ids: (N, 3)
                    acc[key] = (value[row] if batched else value).detach().to(self.device, copy=True)

    def fill(self, record: Record, image: int, finish: Finish) -> None:
        acc = self.images[image]
        if not acc:
            return
        record.replay = {k: torch.stack(v) if isinstance(v, list) else v for k, v in acc.items()}


def build_linear_map(
    query_sums: dict[str, Tensor],
    layers: dict[str, LayerInfo],
    modules: dict[str, nn.Module],
    latent_size: tuple[int, int],
    mode: str,
) -> tuple[Tensor, Tensor | None]:
    """The matrix M (and bias c) with ``linear map of x = M x + c`` at latent size.

    ``sum_{t, l, heads} up_l(Q_{t,l} W_k^l x) = sum_l up_l((sum_t Q_{t,l}) W_k^l) x`` because the sums and
    the interpolation are linear, so M is built from the per-layer query sums once.

    Args:
        query_sums: layer -> ``(N_l, inner)`` queries summed over steps.
        layers: layer -> geometry.
        modules: layer -> its attention module (only ``to_k`` is read).
        latent_size: ``(h, w)``.
        mode: interpolation to latent size.
    """
    h, w = latent_size
    grids: dict[tuple[int, int], Tensor] = {}  # layer size -> (text_dim, hl, wl) summed over its layers
    offsets: dict[tuple[int, int], Tensor] = {}  # the same for the key bias' term, (hl, wl)
    for name, qsum in query_sums.items():
        info = layers[name]
        if not info.key_linear:
            raise ValueError(f"layer {name} normalizes its keys (norm_cross/norm_k): no linear map exists")
        weight, key_bias = key_weight(modules[name])  # (inner, text_dim), (inner,)
        size = (info.height, info.width)
        grid = (qsum @ weight.to(qsum.device)).T.reshape(-1, *size)  # (text_dim, hl, wl)
        grids[size] = grid if size not in grids else grids[size] + grid
        if key_bias is not None:
            b = (qsum @ key_bias.to(qsum.device)).reshape(size)  # (hl, wl)
            offsets[size] = b if size not in offsets else offsets[size] + b
    # interpolation is linear: each size is upsampled once, after its layers are summed (2-4 sizes, not 70 layers)
    total = sum(upsample(g[None], (h, w), mode).reshape(-1, h * w) for g in grids.values())  # (text_dim, h*w)
    bias = sum(upsample(b[None, None], (h, w), mode).reshape(-1) for b in offsets.values()) if offsets else None
    return total.T.contiguous(), bias  # (h*w, text_dim), (h*w,) or None


def _put(buffers: dict[str, Tensor], name: str, row: int, value: Tensor, capacity: int, device: str) -> None:
    """Write one step into a layer's preallocated ``(capacity, ...)`` buffer, growing it if needed.

    One large buffer per layer instead of one small tensor per step keeps the allocator's heap free for the
    denoiser's temporaries (thousands of retained small blocks made generation measurably slower).
    """
    buf = buffers.get(name)
    if buf is None:
        buf = torch.empty((max(capacity, row + 1), *value.shape), dtype=value.dtype, device=device)
        buffers[name] = buf
    elif row >= buf.shape[0]:
        grown = torch.empty((max(2 * buf.shape[0], row + 1), *value.shape), dtype=value.dtype, device=device)
        grown[: buf.shape[0]] = buf
        buffers[name] = buf = grown
    buf[row] = value


def _trim(buffer: Tensor, count: int) -> Tensor:
    """The first ``count`` rows of a per-step buffer (a copy when rows are left over, to free them)."""
    return buffer if buffer.shape[0] == count else buffer[:count].clone()


def recorders_for(config) -> list[Recorder]:
    """The recorders a :class:`~opendaam.tracing.TraceConfig` asks for (the text context always)."""
    device = config.device
    chosen: list[Recorder] = [TextContext(device)]
    if config.daam:
        chosen.append(DaamSums(device))
    if config.daam_per_step:
        chosen.append(DaamPerStep(device))
    if config.queries:
        chosen.append(QueryCache(config.query_dtype, device))
    if config.linear or config.linear_layers:
        chosen.append(LinearMatrix(matrix=config.linear, keep_sums=config.linear_layers, device=device))
    if config.replay:
        chosen.append(ReplayInputs(device))
    return chosen
