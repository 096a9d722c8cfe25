"""Record cross-attention while a diffusers pipeline generates.

``with trace(pipe) as tracer: pipe(...)`` wraps the processor of every cross-attention layer
(``unet.set_attn_processor``, keyed by layer name) and reads the U-Net's input shape and timestep
with a forward pre-hook. The wrapped processors compute the original output untouched, then record,
for the conditional half of the guidance batch only:

* DAAM sums: softmax probabilities summed over steps, per layer and head, ``(heads, N, 77)``;
* the query cache ``Q = W_q h`` per layer and step (open-vocabulary maps for any other prompt);
* running sums of Q per layer, from which the linear map matrix ``M`` is built once at the end,
  so that the linear map of any text embedding ``x`` is ``M x``.

Everything lands in plain :class:`Record` objects (one per generated image, in output order);
computing maps from them is :mod:`opendaam.heatmaps`' job. Second layer of opendaam: imports only
:mod:`opendaam.models`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from opendaam._io import atomic_write_with
from opendaam.models import cross_attention_layers

__all__ = ["FORMAT_VERSION", "LayerInfo", "Record", "TraceConfig", "Tracer", "tokenize_prompt", "trace", "upsample"]

FORMAT_VERSION = 1
"""Version of the record file layout written by :meth:`Record.save`."""

UPSAMPLE_MODES = ("bicubic", "bilinear", "nearest")


@dataclass(frozen=True)
class TraceConfig:
    """What a :func:`trace` records, and how."""

    daam: bool = True  # DAAM sums cost one small matmul per layer and step: always worth it
    daam_per_step: bool = False  # per-step DAAM costs steps x the memory; the query cache can recompute it
    queries: bool = False  # the open-vocabulary query cache is ~0.7 GB per 512 px image: opt in
    query_dtype: str = "float16"  # "float16" keeps maps exact to ~1e-3; "int8" halves memory again
    linear: bool = True  # the linear map matrix M is 4 MB at 256 px and makes any word's map one matmul
    linear_layers: bool = False  # per-layer query sums allow layer/head selection of linear maps (~3x M)
    layers: tuple[str, ...] | None = None  # names or name prefixes of the layers to record; None is all
    steps: tuple[int, ...] | None = None  # U-Net call indices to record (0 = first); None is all
    upsample: str = "bicubic"  # DAAM's interpolation from each layer to latent size; M is built with it
    device: str = "cpu"  # records stay off the accelerator so long runs do not run out of its memory

    def __post_init__(self):
        if self.query_dtype not in ("float16", "int8", "float32", "bfloat16"):
            raise ValueError(f"query_dtype must be float16, bfloat16, float32 or int8, not {self.query_dtype!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if not (self.daam or self.daam_per_step or self.queries or self.linear):
            raise ValueError("nothing to record: enable at least one of daam, daam_per_step, queries, linear")


@dataclass(frozen=True)
class LayerInfo:
    """Geometry of one cross-attention layer, as recorded."""

    name: str  # processor key, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"
    heads: int  # attention heads
    head_dim: int  # channels per head
    scale: float  # softmax temperature the layer uses (1/sqrt(head_dim) in Stable Diffusion)
    height: int  # rows of this layer's feature map
    width: int  # columns of this layer's feature map
    key_bias: bool = False  # W_k has a bias (then the linear map is M x + c)
    key_linear: bool = True  # keys are a linear function of the text (no norm_cross / norm_k)

    @property
    def pixels(self) -> int:
        """Number of query positions, ``height * width``."""
        return self.height * self.width


@dataclass
class Record:
    """What was traced for one generated image: a plain cache of tensors and provenance.

    Attributes:
        meta: JSON-able provenance (prompt, tokens, model, scheduler, steps, guidance, sizes, ...).
        layers: geometry of each recorded layer, keyed by name, in U-Net order.
        context: ``(77, text_dim)`` conditional text states the keys were computed from.
        daam: layer -> ``(heads, N, 77)`` softmax probabilities summed over the recorded steps.
        daam_steps: layer -> ``(steps, heads, N, 77)`` the same per step (opt-in).
        queries: layer -> ``(steps, heads, N, head_dim)`` query cache (fp16, or int8 with ``query_scales``).
        query_scales: layer -> ``(steps, heads, N)`` int8 scales, only for int8 storage.
        query_sums: layer -> ``(N, inner)`` queries summed over steps (opt-in, for layer selection).
        linear_map: ``(h * w, text_dim)`` matrix M: the linear map of x is ``M @ x`` at latent size.
        linear_bias: ``(h * w,)`` the constant term, only when W_k has a bias.
    """

    meta: dict = field(default_factory=dict)
    layers: dict[str, LayerInfo] = field(default_factory=dict)
    context: Tensor | None = None
    daam: dict[str, Tensor] = field(default_factory=dict)
    daam_steps: dict[str, Tensor] = field(default_factory=dict)
    queries: dict[str, Tensor] = field(default_factory=dict)
    query_scales: dict[str, Tensor] = field(default_factory=dict)
    query_sums: dict[str, Tensor] = field(default_factory=dict)
    linear_map: Tensor | None = None
    linear_bias: Tensor | None = None

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(h, w)`` of the latent the U-Net denoised."""
        return tuple(self.meta["latent_size"])

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the decoded image."""
        return tuple(self.meta["image_size"])

    @property
    def tokens(self) -> list[str] | None:
        """Token strings of the generating prompt (start and end tokens included), if known."""
        return self.meta.get("tokens")

    @property
    def steps(self) -> list[int]:
        """U-Net call indices that were recorded, in order."""
        return list(self.meta.get("steps", []))

    def nbytes(self) -> dict[str, int]:
        """Bytes held per kind of tensor (``daam``, ``queries``, ``linear_map``, ...).

        Example:
            >>> Record(linear_map=torch.zeros(4, 2)).nbytes()["linear_map"]
            32
        """
        sizes = {}
        for name, value in _tensor_fields(self):
            size = sum(t.numel() * t.element_size() for t in value.values()) if isinstance(value, dict) else (
                value.numel() * value.element_size()
            )
            sizes[name] = size
        return sizes

    def save(self, path: str | Path) -> Path:
        """Write the record to one safetensors file (tensors) with its metadata as JSON inside.

        The file is written to a temporary name and renamed, so a crash never leaves a truncated
        record. Load it with :func:`opendaam.load_record`.

        Example:
            >>> import tempfile, os
            >>> path = Record(meta={"prompt": "a car"}).save(os.path.join(tempfile.mkdtemp(), "r.safetensors"))
            >>> path.name
            'r.safetensors'
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {}
        for name, value in _tensor_fields(self):
            if isinstance(value, dict):
                for layer, tensor in value.items():
                    tensors[f"{name}/{layer}"] = tensor.contiguous()
            else:
                tensors[name] = value.contiguous()
        header = {
            "format": FORMAT_VERSION,
            "meta": self.meta,
            "layers": [asdict(info) for info in self.layers.values()],
        }
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata={"opendaam": json.dumps(header)}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Record:
        """Read a record written by :meth:`save` (safetensors only, no pickle)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no record at {path}")
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if "opendaam" not in metadata:
                raise ValueError(f"{path} is a safetensors file but not an opendaam record")
            header = json.loads(metadata["opendaam"])
            if header.get("format") != FORMAT_VERSION:
                raise ValueError(
                    f"{path} has record format {header.get('format')}, this opendaam reads {FORMAT_VERSION}"
                )
            record = cls(meta=header["meta"], layers={d["name"]: LayerInfo(**d) for d in header["layers"]})
            for key in handle.keys():
                name, _, layer = key.partition("/")
                tensor = handle.get_tensor(key).clone()  # own, aligned memory: results match the live record
                if layer:
                    getattr(record, name)[layer] = tensor
                else:
                    setattr(record, name, tensor)
        return record


def _tensor_fields(record: Record):
    """(name, value) of the record's non-empty tensor fields."""
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, Tensor) or (isinstance(value, dict) and value and f.name != "meta"
                                         and f.name != "layers"):
            yield f.name, value


def upsample(maps: Tensor, size: tuple[int, int], mode: str = "bicubic") -> Tensor:
    """Resize ``(..., h, w)`` maps to ``size`` with a linear interpolation (no clamping, so it stays linear).

    Example:
        >>> upsample(torch.ones(2, 4, 4), (8, 8)).shape
        torch.Size([2, 8, 8])
    """
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(1, -1, *maps.shape[-2:])  # (1, channels, h, w)
    options = {} if mode == "nearest" else {"align_corners": False}
    out = F.interpolate(flat, size=tuple(size), mode=mode, **options)
    return out.reshape(*lead, *size)


class _Pending:
    """Per-image accumulators of one generation, before they become a :class:`Record`."""

    def __init__(self):
        self.daam: dict[str, Tensor] = {}
        self.daam_steps: dict[str, list[Tensor]] = {}
        self.queries: dict[str, Tensor] = {}  # layer -> (capacity, heads, N, head_dim) buffer
        self.query_scales: dict[str, Tensor] = {}  # layer -> (capacity, heads, N) buffer
        self.query_sums: dict[str, Tensor] = {}
        self.context: Tensor | None = None


_BUFFER_BYTES = 8 << 20
"""Per-layer budget for buffered query inputs: small layers are computed a batch of steps at a time (one
matmul and softmax instead of one per step); a layer whose single step is larger is computed at once."""


class _StepBuffer:
    """A layer's query inputs of the last few steps, with the keys they attend to."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden  # (steps, n, N, dim) preallocated
        self.rows = hidden.unbind(0)  # one (n, N, dim) view per step: copying into a view is the cheapest write
        self.shape, self.dtype = hidden.shape[1:], hidden.dtype
        self.count = 0
        self.positions: list[int] = []
        self.attn = None
        self.context: Tensor | None = None
        self.keys: Tensor | None = None


class Tracer:
    """Installs recording processors on a pipeline's U-Net; use it through :func:`trace`.

    Attributes:
        config: what is recorded.
        layers: the cross-attention layers being recorded, by name.
    """

    def __init__(self, pipe, config: TraceConfig, prompt: str | Sequence[str] | None = None,
                 meta: dict | None = None):
        self.pipe = pipe
        self.config = config
        self.unet = pipe.unet
        all_layers = cross_attention_layers(self.unet)
        self.layers = _select_layers(all_layers, config.layers)
        self._name(prompt, meta)
        self._records: list[Record] = []
        self._made = 0
        self._pending: list[_Pending] = []
        self._gen_meta: dict = {}
        self._timesteps_obj = None
        self._step = -1
        self._rows: slice | None = None
        self._n_images = 0
        self._cfg = False
        self._original: dict | None = None
        self._hook = None
        self._layer_info: dict[str, LayerInfo] = {}
        self._key_cache: dict[str, tuple] = {}
        self._buffers: dict[str, _StepBuffer] = {}

    # -- installing and restoring ---------------------------------------------------------------
    def _install(self) -> None:
        """Wrap the processors of the recorded layers and register the U-Net pre-hook."""
        self._original = dict(self.unet.attn_processors)
        wrapped = dict(self._original)
        for name in self.layers:
            wrapped[name] = _wrap(self._original[name], name, self)
        self.unet.set_attn_processor(wrapped)
        self._hook = self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)

    def _restore(self) -> None:
        """Put back the processors that were there and remove the hook."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._original is not None:
            self.unet.set_attn_processor(self._original)
            self._original = None
        self._finish_generation()

    # -- per U-Net call ---------------------------------------------------------------------------
    def _on_unet_call(self, module, args, kwargs) -> None:
        """Start a step: learn the latent shape, timestep and which batch rows are conditional."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        expected = self._n_images * (2 if self._cfg else 1)
        if timesteps is not self._timesteps_obj or not self._pending or sample.shape[0] != expected:
            self._finish_generation()
            self._timesteps_obj = timesteps
            self._start_generation(sample)
        self._step += 1
        t = timestep.flatten()[0].item() if isinstance(timestep, Tensor) else float(timestep)
        self._gen_meta["timesteps"].append(t)
        self._gen_meta["calls"] = self._step + 1
        recorded = self.config.steps is None or self._step in self.config.steps
        if recorded:
            self._gen_meta["steps"].append(self._step)
        self._rows = slice(sample.shape[0] - self._n_images, sample.shape[0]) if recorded else None

    def _start_generation(self, sample: Tensor) -> None:
        """Open accumulators for the images of a new pipeline call."""
        self._cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
        batch = sample.shape[0]
        if self._cfg and batch % 2:
            raise ValueError(f"classifier-free guidance with an odd U-Net batch ({batch}); cannot split it")
        self._n_images = batch // 2 if self._cfg else batch
        if self.prompts is not None and self._n_images % len(self.prompts):
            raise ValueError(
                f"trace(prompt=...) names {len(self.prompts)} prompts but the pipeline generates "
                f"{self._n_images} images; pass the same prompt list to trace() and to the pipeline"
            )
        self._layer_info: dict[str, LayerInfo] = {}
        scheduled = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        self._capacity = len(self.config.steps) if self.config.steps is not None else (
            len(scheduled) if scheduled is not None else 64)
        self._step = -1
        self._pending = [_Pending() for _ in range(self._n_images)]
        h, w = sample.shape[-2:]
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        scheduler = getattr(self.pipe, "scheduler", None)
        self._gen_meta = {
            "latent_size": [int(h), int(w)],
            "image_size": [int(h) * scale, int(w) * scale],
            "guidance_scale": _float_or_none(getattr(self.pipe, "guidance_scale", None)),
            "classifier_free_guidance": self._cfg,
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "scheduler_config": _jsonable(dict(scheduler.config)) if scheduler is not None else None,
            "pipeline": type(self.pipe).__name__,
            "model": _model_id(self.pipe),
            "revision": _model_revision(self.pipe),
            "timesteps": [],
            "steps": [],
            "calls": 0,
            "trace_config": asdict(self.config),
            "text_dim": int(self.unet.config.cross_attention_dim),
        }

    def _finish_generation(self) -> None:
        """Turn the open accumulators into records (builds the linear map matrix M)."""
        if not self._pending:
            return
        self._flush()
        first = self._made  # images recorded before, popped or not
        self._made += len(self._pending)
        for i, pending in enumerate(self._pending):
            self._records.append(self._to_record(pending, first + i, i))
        self._pending = []
        self._key_cache = {}  # drop the references to this generation's text states

    # -- recording inside a layer -------------------------------------------------------------------
    def _observe(self, name: str, attn, hidden_states: Tensor, encoder_hidden_states: Tensor,
                 temb: Tensor | None) -> None:
        """Buffer one layer's conditional query inputs of the current step; :meth:`_flush` computes from them."""
        rows = self._rows
        if rows is None or encoder_hidden_states is None:
            return
        if torch.is_grad_enabled():  # pipelines run without gradients; a decorator would cost every call
            with torch.no_grad():
                return self._observe(name, attn, hidden_states, encoder_hidden_states, temb)
        h = hidden_states[rows]
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, temb[rows] if temb is not None else None)
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        # h: (n, N, dim) the layer's query input for the conditional rows
        context, keys = self._context_keys(name, attn, encoder_hidden_states)
        position = len(self._gen_meta["steps"]) - 1  # this step's row in the per-step buffers
        buf = self._buffers.get(name)
        if buf is not None and (buf.shape != h.shape or buf.dtype != h.dtype):
            self._flush(name)  # another batch or size: a new buffer
            del self._buffers[name]
            buf = None
        elif buf is not None and buf.count and (buf.keys is not keys or buf.count == len(buf.rows)):
            self._flush(name)  # full, or the text changed: buffered steps use the keys of their own step
        if buf is None:
            step_bytes = h.numel() * h.element_size()
            steps = max(1, min(self._capacity, _BUFFER_BYTES // max(step_bytes, 1)))
            if steps == 1:  # a large layer: nothing to batch, compute from the layer's own tensor
                self._compute(name, attn, h[None], context, keys, [position])
                return
            buf = _StepBuffer(torch.empty((steps, *h.shape), dtype=h.dtype, device=h.device))
            self._buffers[name] = buf
        buf.rows[buf.count].copy_(h)
        buf.count += 1
        buf.positions.append(position)
        buf.attn, buf.context, buf.keys = attn, context, keys

    def _flush(self, name: str | None = None) -> None:
        """Compute what the buffered steps of one layer (all layers when ``name`` is None) contribute."""
        for key in [name] if name is not None else list(self._buffers):
            buf = self._buffers.get(key)
            if buf is None or not buf.count:
                continue
            self._compute(key, buf.attn, buf.hidden[: buf.count], buf.context, buf.keys, buf.positions)
            buf.count, buf.positions, buf.context, buf.keys = 0, [], None, None

    @torch.no_grad()
    def _compute(self, name: str, attn, h: Tensor, context: Tensor, keys: Tensor, positions: list[int]) -> None:
        """Queries, DAAM probabilities and query sums of ``k`` steps of one layer, added to the images' pending
        records; ``h`` is ``(k, n, N, dim)``, ``positions`` the steps' rows in the per-step buffers."""
        query = attn.to_q(h)  # (k, n, N, inner)
        k, n, pixels, inner = query.shape
        heads = attn.heads
        head_dim = inner // heads
        q = query.view(k, n, pixels, heads, head_dim).transpose(2, 3)  # (k, n, heads, N, head_dim)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if name not in self._layer_info:
            self._layer_info[name] = self._describe(name, attn, pixels, heads, head_dim)
        cfg = self.config
        dev = cfg.device
        if cfg.daam or cfg.daam_per_step:
            # softmax over the text tokens, token-major so that max, exp and sum run along contiguous
            # pixels; keys carry log2(e), so exp2 (~3x faster than exp on CPU) gives the same probabilities.
            # A few steps at a time, so that the passes over the probabilities stay in cache.
            qf = q.float()
            shift = not _scores_bounded(qf, keys)  # else exp2 can neither overflow nor empty the sum unshifted
            chunk = max(1, _SOFTMAX_FLOATS // (n * heads * keys.shape[-2] * pixels))
            prob_sum, per_step = None, []
            for i in range(0, k, chunk):
                probs = torch.matmul(keys, qf[i : i + chunk].transpose(-1, -2))  # (c, n, heads, T, N)
                if shift:
                    probs -= probs.amax(dim=-2, keepdim=True)
                probs.exp2_()
                probs /= probs.sum(dim=-2, keepdim=True)
                if cfg.daam_per_step:
                    per_step.append(probs)
                if cfg.daam:
                    part = probs.sum(0)  # (n, heads, T, N), a new tensor: the per-step ones stay untouched
                    prob_sum = part if prob_sum is None else prob_sum.add_(part)
        if cfg.linear or cfg.linear_layers:
            q_flat = q.transpose(2, 3).reshape(k, n, pixels, inner) if attn.norm_q is not None else query
            q_sum = q_flat.float().sum(0) if k > 1 else q_flat[0].float()  # (n, N, inner)
        capacity = self._capacity
        for j in range(n):
            pending = self._pending[j]
            if pending.context is None:
                pending.context = context[j].detach().to(dev, torch.float32, copy=True)  # (77, text_dim)
            if cfg.daam:
                p = prob_sum[j].to(dev)  # (heads, T, N)
                if name in pending.daam:
                    pending.daam[name] += p
                else:
                    pending.daam[name] = p.clone()
            if cfg.daam_per_step:
                steps_j = pending.daam_steps.setdefault(name, [])
                for probs in per_step:  # (c, n, heads, T, N) pieces in step order
                    steps_j.extend(probs[:, j].to(dev, torch.float16).unbind(0))
            if cfg.queries:
                stored, scales = _store_queries(q[:, j], cfg.query_dtype)  # (k, heads, N, head_dim)
                for i, position in enumerate(positions):
                    _put(pending.queries, name, position, stored[i], capacity, dev)
                    if scales is not None:
                        _put(pending.query_scales, name, position, scales[i], capacity, dev)
            if cfg.linear or cfg.linear_layers:
                qs = q_sum[j].to(dev)  # (N, inner)
                if name in pending.query_sums:
                    pending.query_sums[name] += qs
                else:
                    pending.query_sums[name] = qs.clone()

    def _context_keys(self, name: str, attn, encoder_hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """The conditional rows' text states ``(n, T, text_dim)`` and keys ``(n, heads, T, head_dim)`` scaled
        by the layer's softmax scale and log2(e), computed once per generation while the pipeline passes the same,
        unmodified text-state tensor (a held reference, so its identity cannot be reused)."""
        cached = self._key_cache.get(name)
        if (cached is not None and cached[0] is encoder_hidden_states
                and cached[1] == encoder_hidden_states._version and cached[2] == self._rows):
            return cached[3], cached[4]
        context = encoder_hidden_states[self._rows]  # (n, T, text_dim)
        keys_in = attn.norm_encoder_hidden_states(context) if attn.norm_cross else context
        key = attn.to_k(keys_in)  # (n, T, inner)
        heads = attn.heads
        k = key.view(key.shape[0], -1, heads, key.shape[-1] // heads).transpose(1, 2)  # (n, heads, T, head_dim)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        keys = (k.float() * (attn.scale / math.log(2))).contiguous()  # (n, heads, T, head_dim)
        self._key_cache[name] = (encoder_hidden_states, encoder_hidden_states._version, self._rows, context, keys)
        return context, keys

    def _describe(self, name: str, attn, pixels: int, heads: int, head_dim: int) -> LayerInfo:
        """Geometry of a layer from the latent size of this generation and the layer's query count."""
        lh, lw = self._gen_meta["latent_size"]
        height, width = _layer_shape(lh, lw, pixels, name)
        return LayerInfo(
            name=name, heads=heads, head_dim=head_dim, scale=float(attn.scale), height=height, width=width,
            key_bias=attn.to_k.bias is not None,
            key_linear=not attn.norm_cross and attn.norm_k is None,
        )

    def _to_record(self, pending: _Pending, index: int, row: int) -> Record:
        """Build one image's record: stack per-step tensors, build M, attach provenance."""
        meta = _jsonable(dict(self._gen_meta))
        meta["index"] = index
        meta.update(self.extra_meta)
        if self.prompts is not None:
            k = row // (self._n_images // len(self.prompts))
            meta["prompt"] = self.prompts[k]
            meta["token_ids"], meta["tokens"] = self._prompt_tokens[k]
        layers = {n: self._layer_info[n] for n in self.layers if n in self._layer_info}
        record = Record(meta=meta, layers=layers, context=pending.context)
        if self.config.daam:  # accumulated token-major: (heads, T, N) -> (heads, N, T)
            record.daam = {n: v.transpose(-1, -2).contiguous() for n, v in pending.daam.items()}
        if self.config.daam_per_step:  # (steps, heads, N, T)
            record.daam_steps = {n: torch.stack(v).transpose(-1, -2).contiguous()
                                 for n, v in pending.daam_steps.items()}
        if self.config.queries:
            count = len(self._gen_meta["steps"])
            record.queries = {n: _trim(v, count) for n, v in pending.queries.items()}  # (S, heads, N, head_dim)
            record.query_scales = {n: _trim(v, count) for n, v in pending.query_scales.items()}
        if self.config.linear and pending.query_sums:
            keys = {n: self.layers[n].to_k for n in layers}
            record.linear_map, record.linear_bias = build_linear_map(
                pending.query_sums, layers, keys, record.latent_size, self.config.upsample
            )
        if self.config.linear_layers:
            record.query_sums = pending.query_sums
        return record

    @property
    def records(self) -> list[Record]:
        """One :class:`Record` per generated image, in the pipeline's output order."""
        self._finish_generation()
        return list(self._records)

    def next(self, prompt: str | Sequence[str] | None = None, meta: dict | None = None) -> None:
        """Name the prompt(s) and extra metadata of the next pipeline calls' records, so that one trace
        serves a loop of generations (installing and restoring processors walks the whole U-Net).

        Example:
            >>> from opendaam.models import build_pipeline
            >>> pipe = build_pipeline("tiny")
            >>> with trace(pipe) as tracer:
            ...     for seed, prompt in enumerate(["a car", "a tree"]):
            ...         tracer.next(prompt=prompt, meta={"seed": seed})
            ...         _ = pipe(prompt, num_inference_steps=1, height=32, width=32, output_type="np")
            ...         record = tracer.pop_records()[0]
            ...         print(record.meta["prompt"], record.meta["seed"], len(tracer.records))
            a car 0 0
            a tree 1 0
        """
        self._finish_generation()  # records of earlier calls keep their own prompt and metadata
        self._name(prompt, meta)

    def _name(self, prompt: str | Sequence[str] | None, meta: dict | None) -> None:
        """Set the prompts (tokenized, checked against the 77-token limit) and metadata of coming records."""
        self.prompts = [prompt] if isinstance(prompt, str) else (list(prompt) if prompt is not None else None)
        if self.prompts is not None:
            self._prompt_tokens = [tokenize_prompt(self.pipe, p) for p in self.prompts]
        self.extra_meta = dict(meta or {})

    def pop_records(self) -> list[Record]:
        """The records made so far (as :attr:`records`), removed from the tracer to free their memory."""
        self._finish_generation()
        taken, self._records = self._records, []
        return taken


def build_linear_map(
    query_sums: dict[str, Tensor],
    layers: dict[str, LayerInfo],
    keys: dict[str, torch.nn.Linear],
    latent_size: tuple[int, int],
    mode: str,
) -> tuple[Tensor, Tensor | None]:
    """The matrix M (and bias c) with ``linear map of x = M x + c`` at latent size.

    ``sum_{t, l, heads} up_l(Q_{t,l} W_k^l x) = sum_l up_l((sum_t Q_{t,l}) W_k^l) x`` because the sums and
    the interpolation are linear, so M is built from the per-layer query sums once.
    """
    h, w = latent_size
    total = None
    bias = None
    for name, qsum in query_sums.items():
        info = layers[name]
        if not info.key_linear:
            raise ValueError(f"layer {name} normalizes its keys (norm_cross/norm_k): no linear map exists")
        weight = keys[name].weight.detach().to(qsum.device, torch.float32)  # (inner, text_dim)
        projected = qsum @ weight  # (N, text_dim)
        grid = projected.T.reshape(1, -1, info.height, info.width)  # (1, text_dim, hl, wl)
        up = upsample(grid, (h, w), mode).reshape(-1, h * w)  # (text_dim, h*w)
        total = up if total is None else total + up
        if keys[name].bias is not None:
            b = qsum @ keys[name].bias.detach().to(qsum.device, torch.float32)  # (N,)
            up_b = upsample(b.reshape(1, info.height, info.width), (h, w), mode).reshape(-1)  # (h*w,)
            bias = up_b if bias is None else bias + up_b
    return total.T.contiguous(), bias  # (h*w, text_dim), (h*w,) or None


def _put(buffers: dict[str, Tensor], name: str, row: int, value: Tensor, capacity: int, device: str) -> None:
    """Write one step into a layer's preallocated ``(capacity, ...)`` buffer, growing it if needed.

    One large buffer per layer instead of one small tensor per step keeps the allocator's heap free for the
    U-Net's temporaries (thousands of retained small blocks made generation measurably slower).
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


def _store_queries(q: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """Queries ``(heads, N, head_dim)`` in the cache's storage dtype, contiguous (heads first, so maps are
    computed without reshuffling); int8 keeps one absmax scale per head and pixel."""
    if dtype != "int8":
        return q.to(getattr(torch, dtype), memory_format=torch.contiguous_format), None
    scale = q.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (heads, N, 1)
    codes = torch.round(q.float() / scale).clamp_(-127, 127).to(torch.int8).contiguous()
    return codes, scale.squeeze(-1).to(torch.float16)  # (heads, N, head_dim) int8, (heads, N) fp16


def _layer_shape(latent_h: int, latent_w: int, pixels: int, name: str) -> tuple[int, int]:
    """(rows, cols) of a layer's feature map: the latent halved (rounding up) until it has ``pixels``."""
    h, w = latent_h, latent_w
    for _ in range(16):
        if h * w == pixels:
            return h, w
        if h * w < pixels:
            break
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    raise ValueError(f"cannot place {pixels} query positions of layer {name} on a {latent_h}x{latent_w} latent")


def _select_layers(layers: dict, selectors: Sequence[str] | None) -> dict:
    """The layers whose names equal or start with one of ``selectors`` (all when None)."""
    if selectors is None:
        return dict(layers)
    chosen = {}
    for sel in selectors:
        matched = {n: m for n, m in layers.items() if n == sel or n.startswith(sel)}
        if not matched:
            raise ValueError(f"unknown layer {sel!r}; valid layer names: {', '.join(layers)}")
        chosen.update(matched)
    return {n: layers[n] for n in layers if n in chosen}


def tokenize_prompt(pipe, prompt: str) -> tuple[list[int], list[str]]:
    """Token ids and strings of ``prompt`` (start and end included); error past the model's 77 tokens."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt, truncation=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        raise ValueError(
            f"prompt has {len(ids)} tokens but the text encoder reads at most {limit} (start and end "
            f"included); shorten it: {prompt!r}"
        )
    return ids, tokenizer.convert_ids_to_tokens(ids)


_SOFTMAX_FLOATS = 2**21
"""Probabilities computed at once per layer (8 MB of float32): steps are batched up to it, so that the
passes of the softmax run on cache-resident data (measured: faster than one pass over all steps for the
Stable Diffusion 2 layers at 256 px and for toy-urban, and than 2 MB pieces for the large layers)."""

_EXP2_SAFE = 62.0
"""Largest score (log2 units) for which softmax needs no max subtraction: 2^62 cannot overflow float32 and
the largest term of a sum stays above 2^-62, far from underflow."""


def _scores_bounded(q: Tensor, keys: Tensor) -> bool:
    """Whether every score ``q . k`` is within +-``_EXP2_SAFE`` by Cauchy-Schwarz (CPU only: on an
    accelerator the check would wait for the device, so the max is always subtracted there)."""
    if q.device.type != "cpu":
        return False
    bound = q.norm(dim=-1).amax() * keys.norm(dim=-1).amax()  # >= max |score| over pixels and tokens
    return bool(bound < _EXP2_SAFE)


def _wrap(inner, name: str, tracer: Tracer):
    """A processor that runs ``inner`` unchanged, then records; its signature mirrors ``inner``'s."""
    base = _RecordingProcessor
    try:
        signature = inspect.signature(type(inner).__call__)
    except (TypeError, ValueError):
        return base(inner, name, tracer)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return base.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"Recording{type(inner).__name__}", (base,), {"__call__": __call__})
    return cls(inner, name, tracer)


class _RecordingProcessor:
    """Runs the original processor, then hands the layer's inputs to the tracer."""

    def __init__(self, inner, name: str, tracer: Tracer):
        self.inner = inner
        self.name = name
        self.tracer = tracer

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        self.tracer._observe(self.name, attn, hidden_states, encoder_hidden_states, temb)
        return out


@contextmanager
def trace(
    pipe,
    config: TraceConfig | None = None,
    *,
    prompt: str | Sequence[str] | None = None,
    meta: dict | None = None,
    **options,
) -> Iterator[Tracer]:
    """Record cross-attention during generation; the original processors come back on exit, even on error.

    Args:
        pipe: a diffusers pipeline with a ``unet`` (text-to-image, image-to-image, ...).
        config: what to record; keyword ``options`` override its fields (``queries=True``, ...).
        prompt: the prompt (or list of prompts) given to the pipeline, to name tokens in the records;
            with several images per prompt, records follow the pipeline's order (prompt-major).
        meta: extra JSON-able provenance stored in every record (a seed, a dataset id, ...).

    Yields:
        The :class:`Tracer`; ``tracer.records`` has one :class:`Record` per generated image.

    Example:
        >>> from opendaam.models import build_pipeline
        >>> pipe = build_pipeline("tiny")
        >>> with trace(pipe, prompt="a red car") as tracer:
        ...     _ = pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="np")
        >>> record = tracer.records[0]
        >>> record.tokens[2], record.linear_map.shape
        ('red</w>', torch.Size([256, 32]))
    """
    config = replace(config or TraceConfig(), **options)
    tracer = Tracer(pipe, config, prompt=prompt, meta=meta)
    tracer._install()
    try:
        yield tracer
    finally:
        tracer._restore()


def _model_id(pipe) -> str | None:
    """The hub id or folder the pipeline was loaded from, if diffusers knows it."""
    return getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or None


def _model_revision(pipe) -> str | None:
    """The hub commit of the U-Net weights, when loaded from the hub."""
    return pipe.unet.config.get("_commit_hash") if hasattr(pipe.unet, "config") else None


def _float_or_none(value) -> float | None:
    """``float(value)`` or None."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _jsonable(value):
    """A JSON-serializable copy of configs (tuples to lists, tensors and numpy to lists, others to str)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
