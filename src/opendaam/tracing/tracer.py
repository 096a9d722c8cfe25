"""The tracer: one context manager that records cross-attention while a diffusers pipeline generates.

``with trace(pipe) as tracer: pipe(...)`` asks the pipeline's architecture adapter for its text-conditioned
attention layers, wraps their processors and pre-hooks the denoiser (:mod:`~opendaam.tracing.hooks`), and hands
each layer's conditional query inputs to the recorders chosen by :class:`TraceConfig`
(:mod:`~opendaam.tracing.recorders`), a few steps at a time. Each pipeline call's prompt is read from its text
encoder calls, so every record is named without being told. Everything it changed is restored on exit, even on
error.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from opendaam.attention import LOG2E, UPSAMPLE_MODES, image_queries, key_linear, text_keys
from opendaam.tracing.adapters import adapter_for
from opendaam.tracing.hooks import GenerationClock, ProcessorHooks, TextCall, TextEncoderHooks
from opendaam.tracing.recorders import Finish, LayerBatch, probability_chunks, recorders_for
from opendaam.tracing.records import LayerInfo, Record

__all__ = ["TraceConfig", "Tracer", "tokenize_prompt", "trace"]


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
    """Records a pipeline's text-conditioned attention; use it through :func:`trace`.

    Attributes:
        config: what is recorded.
        layers: the attention layers being recorded, by name.
        adapter: the architecture adapter of the pipeline's denoiser.
    """

    def __init__(self, pipe, config: TraceConfig, prompt: str | Sequence[str] | None = None,
                 meta: dict | None = None):
        self.pipe = pipe
        self.config = config
        self.adapter = adapter_for(pipe)
        self.denoiser = self.adapter.denoiser(pipe)
        self.layers = _select_layers(self.adapter.layers(self.denoiser), config.layers)
        self.recorders = recorders_for(config)
        self._prob_users = [r for r in self.recorders if r.uses_probs]
        self._name(prompt, meta)
        self._records: list[Record] = []
        self._made = 0
        self._open = False  # a generation's accumulators are open
        self._gen_meta: dict = {}
        self._clock = GenerationClock(pipe, config.steps)
        self._rows: slice | None = None
        self._hooks: ProcessorHooks | None = None
        self._text: TextEncoderHooks | None = None
        self._text_calls: list[TextCall] = []
        self._layer_info: dict[str, LayerInfo] = {}
        self._key_cache: dict[str, tuple] = {}
        self._buffers: dict[str, _StepBuffer] = {}

    # -- installing and restoring ---------------------------------------------------------------
    def _install(self) -> None:
        """Wrap the processors of the recorded layers, pre-hook the denoiser, hook the text encoders."""
        self._text = TextEncoderHooks(self.pipe)
        self._hooks = ProcessorHooks(self.denoiser, list(self.layers), self._observe, self._on_call)

    def _restore(self, failed: bool = False) -> None:
        """Take out what :meth:`_install` added; records of an interrupted generation are marked incomplete."""
        for hooks in (self._hooks, self._text):
            if hooks is not None:
                hooks.remove()
        self._hooks = self._text = None
        self._finish_generation(interrupted=failed)

    # -- per denoiser call ------------------------------------------------------------------------
    def _on_call(self, module, args, kwargs) -> None:
        """Start a step: learn the latent shape, timestep and which batch rows are conditional."""
        sample, timestep = self.adapter.sample(args, kwargs)
        tick = self._clock.tick(sample)
        if tick.new_generation or not self._open:
            self._finish_generation(end_clock=False)  # the clock already runs the new generation
            self._start_generation(sample)
        t = timestep.flatten()[0].item() if isinstance(timestep, Tensor) else float(timestep)
        self._gen_meta["timesteps"].append(t)
        self._gen_meta["calls"] = tick.step + 1
        if tick.rows is not None:
            self._gen_meta["steps"].append(tick.step)
        self._rows = tick.rows

    def _start_generation(self, sample: Tensor) -> None:
        """Open accumulators for the images of a new pipeline call."""
        images = self._images = self._clock.images
        self._cfg = self._clock.cfg
        if self.prompts is not None and images % len(self.prompts):
            raise ValueError(
                f"trace(prompt=...) names {len(self.prompts)} prompts but the pipeline generates "
                f"{images} images; pass the same prompt list to trace() and to the pipeline"
            )
        self._text_calls = self._text.take() if self._text is not None else []
        self._layer_info = {}
        scheduler = getattr(self.pipe, "scheduler", None)
        scheduled = getattr(scheduler, "timesteps", None)
        self._capacity = len(self.config.steps) if self.config.steps is not None else (
            len(scheduled) if scheduled is not None else 64)
        for recorder in self.recorders:
            recorder.start(images, self._capacity)
        self._open = True
        h, w = sample.shape[-2:]
        scale = int(getattr(self.pipe, "vae_scale_factor", 8))
        self._gen_meta = {
            "latent_size": [int(h), int(w)],
            "image_size": [int(h) * scale, int(w) * scale],
            "vae_scale_factor": scale,
            "guidance_scale": _float_or_none(getattr(self.pipe, "guidance_scale", None)),
            "classifier_free_guidance": self._cfg,
            "scheduler": type(scheduler).__name__ if scheduler is not None else None,
            "scheduler_config": _jsonable(dict(scheduler.config)) if scheduler is not None else None,
            "pipeline": type(self.pipe).__name__,
            "model": _model_id(self.pipe),
            "revision": _model_revision(self.denoiser),
            "timesteps": [],
            "steps": [],
            "calls": 0,
            "scheduled_calls": len(scheduled) if scheduled is not None else None,
            "trace_config": asdict(self.config),
            "text_dim": self.adapter.text_dim(self.denoiser),
        }

    def _finish_generation(self, interrupted: bool = False, end_clock: bool = True) -> None:
        """Turn the open accumulators into records (builds the linear map matrix M); with ``end_clock`` the
        next denoiser call starts a new generation."""
        if end_clock:
            self._clock.end()
        if not self._open:
            return
        self._flush()
        images = self._images
        first = self._made  # images recorded before, popped or not
        self._made += images
        meta = self._gen_meta
        scheduled = meta.get("scheduled_calls")
        # a pipeline stopped early (an exception, or a callback that interrupts) made fewer calls than scheduled
        meta["complete"] = not interrupted and (scheduled is None or meta["calls"] >= scheduled)
        finish = Finish(
            layers={n: self._layer_info[n] for n in self.layers if n in self._layer_info},
            modules=self.layers, latent_size=tuple(meta["latent_size"]), steps=len(meta["steps"]),
            upsample=self.config.upsample,
        )
        for i in range(images):
            self._records.append(self._to_record(finish, first + i, i))
        self._open = False
        self._key_cache = {}  # drop the references to this generation's text states
        self._text_calls = []

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
        h = self.adapter.query_input(attn, hidden_states[rows], temb[rows] if temb is not None else None)
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
        """Hand ``k`` steps of one layer to the recorders; ``h`` is ``(k, n, N, dim)``, ``positions`` the steps'
        rows in the per-step buffers."""
        flat, q = image_queries(attn, h)  # (k, n, N, inner), (k, n, heads, N, head_dim)
        _, _, heads, pixels, head_dim = q.shape
        if name not in self._layer_info:
            self._layer_info[name] = self._describe(name, attn, pixels, heads, head_dim)
        batch = LayerBatch(name=name, attn=attn, info=self._layer_info[name], flat=flat, q=q, context=context,
                           keys=keys, positions=positions)
        if self._prob_users:
            for probs in probability_chunks(batch):  # (c, n, heads, T, N), a few steps at a time, in cache
                for recorder in self._prob_users:
                    recorder.add_probs(batch, probs)
        for recorder in self.recorders:
            recorder.add(batch)

    def _context_keys(self, name: str, attn, encoder_hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """The conditional rows' text states ``(n, T, text_dim)`` and keys ``(n, heads, T, head_dim)`` scaled
        by the layer's softmax scale and log2(e), computed once per generation while the pipeline passes the same,
        unmodified text-state tensor (a held reference, so its identity cannot be reused)."""
        cached = self._key_cache.get(name)
        if (cached is not None and cached[0] is encoder_hidden_states
                and cached[1] == encoder_hidden_states._version and cached[2] == self._rows):
            return cached[3], cached[4]
        context = encoder_hidden_states[self._rows]  # (n, T, text_dim)
        k = text_keys(attn, context, exact_module=True)  # (n, heads, T, head_dim)
        keys = (k.float() * (attn.scale * LOG2E)).contiguous()
        self._key_cache[name] = (encoder_hidden_states, encoder_hidden_states._version, self._rows, context, keys)
        return context, keys

    def _describe(self, name: str, attn, pixels: int, heads: int, head_dim: int) -> LayerInfo:
        """Geometry of a layer from the latent size of this generation and the layer's query count."""
        lh, lw = self._gen_meta["latent_size"]
        height, width = _layer_shape(lh, lw, pixels, name)
        return LayerInfo(
            name=name, heads=heads, head_dim=head_dim, scale=float(attn.scale), height=height, width=width,
            key_bias=attn.to_k.bias is not None, key_linear=key_linear(attn),
        )

    def _to_record(self, finish: Finish, index: int, row: int) -> Record:
        """Build one image's record from the recorders' accumulators, with provenance."""
        meta = _jsonable(dict(self._gen_meta))
        meta["index"] = index
        meta.update(self.extra_meta)
        record = Record(meta=meta, layers=dict(finish.layers))
        for recorder in self.recorders:
            recorder.fill(record, row, finish)
        prompt, ids, tokens = self._prompt_of(row, record.context)
        if prompt is not None:
            meta["prompt"] = prompt
        if ids is not None:
            meta["token_ids"], meta["tokens"] = ids, tokens
        return record

    # -- naming prompts ----------------------------------------------------------------------------
    def _prompt_of(self, row: int, context: Tensor | None) -> tuple[str | None, list[int] | None, list[str] | None]:
        """Prompt text, token ids and token strings of image ``row`` of the running generation.

        What the text encoder was called with wins; a prompt named with ``trace(prompt=...)`` or :meth:`next`
        fills in when the pipeline was given ``prompt_embeds`` (it is checked against the encoder's call when
        there is one)."""
        images = self._images
        captured = _conditional_call(self._text_calls, self._cfg, context)
        seen = None
        if captured is not None and captured.input_ids.shape[0]:
            per = max(1, images // captured.input_ids.shape[0])
            seen = _trim_ids(self.pipe.tokenizer, captured.input_ids[min(row // per, captured.input_ids.shape[0] - 1)])
        if self.prompts is not None:
            k = row // (images // len(self.prompts))
            ids, tokens = self._prompt_tokens[k]
            if seen is None or seen == ids:
                return self.prompts[k], ids, tokens
            warnings.warn(
                f"the prompt named for this trace ({self.prompts[k]!r}) is not what the pipeline encoded "
                f"({self.pipe.tokenizer.decode(seen[1:-1])!r}); the record uses the encoded prompt. Name each "
                "call's prompt with tracer.next(prompt=...), or leave prompt= out", UserWarning, stacklevel=2)
        if seen is None:
            return None, None, None
        return self.pipe.tokenizer.decode(seen[1:-1]), seen, self.pipe.tokenizer.convert_ids_to_tokens(seen)

    @property
    def records(self) -> list[Record]:
        """One :class:`Record` per generated image, in the pipeline's output order."""
        self._finish_generation()
        return list(self._records)

    def next(self, prompt: str | Sequence[str] | None = None, meta: dict | None = None) -> None:
        """Name the prompt(s) and extra metadata of the next pipeline calls' records, so that one trace
        serves a loop of generations (installing and restoring processors walks the whole U-Net). Prompts
        are read from the pipeline's text encoder calls anyway; naming them matters when the pipeline is given
        ``prompt_embeds``.

        Example:
            >>> from opendaam.models import build_pipeline
            >>> pipe = build_pipeline("tiny")
            >>> with trace(pipe) as tracer:
            ...     for seed, prompt in enumerate(["a car", "a tree"]):
            ...         tracer.next(meta={"seed": seed})
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


def _conditional_call(calls: list[TextCall], cfg: bool, context: Tensor | None) -> TextCall | None:
    """The first text encoder's call that encoded the conditional prompt, among a generation's calls.

    The call one of whose states (last or hidden) holds the conditional context's first columns is it. Where no
    state matches (a pipeline that transforms them, such as clip_skip's final norm), diffusers' order decides:
    the prompt is encoded before the negative prompt, so the first call is the prompt's unless guidance is on and
    there was only one call (then it may be the negative prompt's, with ``prompt_embeds`` given: unknown)."""
    first = [c for c in calls if c.encoder == 0]
    if context is not None:
        for call in first:
            for states in call.states:
                width = states.shape[-1]
                if states.shape[-2] == context.shape[0] and width <= context.shape[1] and any(
                        torch.equal(row.float(), context[:, :width]) for row in states):
                    return call
    if not first or (cfg and len(first) < 2):
        return None
    return first[0]


def _trim_ids(tokenizer, ids: Tensor) -> list[int]:
    """Token ids up to and including the first end token (the padding the pipeline added is dropped)."""
    ids = ids.tolist()
    end = tokenizer.eos_token_id
    return ids[: ids.index(end) + 1] if end in ids else ids


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
        pipe: a diffusers pipeline whose denoiser a supported adapter knows (a U-Net with cross-attention:
            Stable Diffusion 1/2, SDXL; text-to-image, image-to-image, ...).
        config: what to record; keyword ``options`` override its fields (``queries=True``, ...).
        prompt: optional: the prompt (or list of prompts) of the next pipeline call. Each call's prompt is
            read from its text encoder calls; name it when the pipeline is given ``prompt_embeds``.
        meta: extra JSON-able provenance stored in every record (a seed, a dataset id, ...).

    Yields:
        The :class:`Tracer`; ``tracer.records`` has one :class:`Record` per generated image. Records of a
        generation that stopped early (an error inside the ``with`` block) carry ``meta["complete"] = False``.

    Example:
        >>> from opendaam.models import build_pipeline
        >>> pipe = build_pipeline("tiny")
        >>> with trace(pipe) as tracer:
        ...     _ = pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="np")
        ...     _ = pipe("a tree", num_inference_steps=2, height=32, width=32, output_type="np")
        >>> first, second = tracer.records
        >>> first.tokens[2], second.meta["prompt"], first.linear_map.shape
        ('red</w>', 'a tree', torch.Size([256, 32]))
    """
    config = replace(config or TraceConfig(), **options)
    tracer = Tracer(pipe, config, prompt=prompt, meta=meta)
    tracer._install()
    failed = True
    try:
        yield tracer
        failed = False
    finally:
        tracer._restore(failed=failed)


def _model_id(pipe) -> str | None:
    """The hub id or folder the pipeline was loaded from, if diffusers knows it."""
    return getattr(pipe, "name_or_path", None) or pipe.config.get("_name_or_path") or None


def _model_revision(denoiser) -> str | None:
    """The hub commit of the denoiser's weights, when loaded from the hub."""
    return denoiser.config.get("_commit_hash") if hasattr(denoiser, "config") else None


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
