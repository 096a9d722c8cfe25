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

from opendaam.attention import LOG2E, UPSAMPLE_MODES, softmax_maps
from opendaam.tracing.adapters import LayerCall, LayerKind, adapter_for, layer_presets
from opendaam.tracing.hooks import GenerationClock, ProcessorHooks, TextCall, TextEncoderHooks
from opendaam.tracing.recorders import Finish, LayerBatch, Recorder, probability_chunks, recorders_for
from opendaam.tracing.records import LayerInfo, Record

__all__ = ["TraceConfig", "Tracer", "expand_layers", "prompt_segments", "tokenize_prompt", "trace"]


@dataclass(frozen=True)
class TraceConfig:
    """What a :func:`trace` records, and how."""

    daam: bool = True  # DAAM sums cost one small matmul per layer and step: always worth it
    daam_per_step: bool = False  # per-step DAAM costs steps x the memory; the query cache can recompute it
    queries: bool = False  # the open-vocabulary query cache is ~0.7 GB per 512 px image: opt in
    query_dtype: str = "float16"  # "float16" keeps maps exact to ~1e-3; "int8" halves memory again
    linear: bool | None = None  # M (4 MB at 256 px, any word's map in one matmul) wherever keys are linear in the text
    linear_layers: bool = False  # per-layer query sums allow layer/head selection of linear maps (~3x M)
    layers: tuple[str, ...] | None = None  # names, prefixes or presets ("late", Flux "single") to record; None: all
    steps: tuple[int, ...] | None = None  # U-Net call indices to record (0 = first); None is all
    upsample: str = "bicubic"  # DAAM's interpolation from each layer to latent size; M is built with it
    joint_slice: bool = False  # MM-DiT: the text columns of the joint softmax (costs the image-image scores too)
    replay: bool = False  # MM-DiT: keep each step's latent (small) so open_vocab can rerun a new text's stream
    self_attention: tuple[str, ...] | None = None  # self-attention layers to keep (N^2 floats each) for refinement
    device: str = "cpu"  # records stay off the accelerator so long runs do not run out of its memory

    def __post_init__(self):
        if self.query_dtype not in ("float16", "int8", "float32", "bfloat16"):
            raise ValueError(f"query_dtype must be float16, bfloat16, float32 or int8, not {self.query_dtype!r}")
        if self.upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {', '.join(UPSAMPLE_MODES)}, not {self.upsample!r}")
        if not (self.daam or self.daam_per_step or self.queries or self.linear is not False or self.replay):
            raise ValueError("nothing to record: enable at least one of daam, daam_per_step, queries, linear")


_SELF = LayerKind()  # image self-attention: the query input is computed as in cross-attention

_BUFFER_BYTES = 8 << 20
"""Per-layer budget for buffered queries: small layers are computed a batch of steps at a time (one matmul and
softmax instead of one per step); a layer whose single step is larger is computed at once."""


class _StepBuffer:
    """A layer's query projections of the last few steps, with the keys they attend to."""

    def __init__(self, hidden: Tensor):
        self.hidden = hidden  # (steps, n, N, dim) preallocated
        self.rows = hidden.unbind(0)  # one (n, N, dim) view per step: copying into a view is the cheapest write
        self.shape, self.dtype = hidden.shape[1:], hidden.dtype
        self.count = 0
        self.positions: list[int] = []
        self.attn = None
        self.context: Tensor | None = None
        self.keys: Tensor | None = None
        self.bias: Tensor | None = None
        self.call: LayerCall | None = None


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
        self.adapter = adapter_for(pipe)
        if config.linear is None:
            config = replace(config, linear=self.adapter.linear_keys)
        elif (config.linear or config.linear_layers) and not self.adapter.linear_keys:
            raise ValueError(
                f"linear maps need keys that are linear in one text context shared by all layers; in "
                f"{self.adapter.family} later blocks' text states depend on the image. Trace without linear=True "
                "(daam and open_vocab work)")
        self.config = config
        self.denoiser = self.adapter.denoiser(pipe)
        self.layers = _select_layers(self.adapter.layers(self.denoiser), config.layers)
        self.kinds = {name: self.adapter.kind(name, module) for name, module in self.layers.items()}
        self.self_layers = {} if config.self_attention is None else _select_layers(
            self.adapter.self_layers(self.denoiser), config.self_attention)
        self._affinity: dict[str, list] = {}  # per self-attention layer, per image: summed (N, N) and grid
        if config.replay and self.adapter.linear_keys:
            raise ValueError(f"replay=True is for joint attention; in {self.adapter.family} open-vocabulary maps "
                             "come from the query cache: trace with queries=True")
        if config.joint_slice and not any(kind.joint for kind in self.kinds.values()):
            raise ValueError(f"joint_slice=True reads joint attention; {self.adapter.family} attends to the text "
                             "alone, so its DAAM is already the whole softmax: leave joint_slice out")
        self.recorders = recorders_for(config)
        self._prob_users = [r for r in self.recorders if r.uses_probs]
        self._call_users = [r for r in self.recorders if type(r).on_call is not Recorder.on_call]
        self._name(prompt, meta)
        self._records: list[Record] = []
        self._made = 0
        self._open = False  # a generation's accumulators are open
        self._gen_meta: dict = {}
        self._clock = GenerationClock(pipe, config.steps, branches=self.adapter.branch_calls)
        self._text_len = 0  # text tokens of the current denoiser call
        self._gen_text: Tensor | None = None  # (n, T, D) conditional text input of the generation's first call
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
        capture = {name: self.kinds[name].projections(module) for name, module in self.layers.items()}
        capture.update({name: [module.to_q, module.to_k] for name, module in self.self_layers.items()})
        self._hooks = ProcessorHooks(self.denoiser, list(self.layers) + list(self.self_layers), self._observe,
                                     self._on_call, capture)

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
        t = timestep.flatten()[0].item() if isinstance(timestep, Tensor) else _float_or_none(timestep)
        tick = self._clock.tick(sample, t)
        text = self.adapter.text_input(args, kwargs)
        self._text_len = int(text.shape[1]) if isinstance(text, Tensor) and text.ndim == 3 else 0
        if tick.branch != "conditional":
            self._rows = None
            return
        if tick.new_generation or not self._open:
            self._finish_generation(end_clock=False)  # the clock already runs the new generation
            self._start_generation(sample, kwargs)
            rows = slice(sample.shape[0] - self._images, sample.shape[0])
            self._gen_text = text[rows].detach().clone() if isinstance(text, Tensor) else None
        self._gen_meta["timesteps"].append(t)
        self._gen_meta["calls"] = tick.step + 1
        if tick.rows is not None:
            self._gen_meta["steps"].append(tick.step)
            for recorder in self._call_users:
                recorder.on_call(tick.rows, args, kwargs)
        self._rows = tick.rows

    def _start_generation(self, sample: Tensor, kwargs: dict) -> None:
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
        h, w = self.adapter.latent_size(sample, kwargs)
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
            "family": self.adapter.family,
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
        self._gen_text = None
        self._affinity = {}

    # -- recording inside a layer -------------------------------------------------------------------
    def _observe(self, name: str, attn, hidden_states: Tensor, inputs: dict) -> None:
        """Buffer one layer's conditional queries of the current step (the model's own ``to_q`` output, taken by a
        forward hook); :meth:`_flush` computes from them."""
        rows = self._rows
        projected = (self._hooks.take(name, 0), self._hooks.take(name, 1))  # handed over once, used or not
        if name in self.self_layers:
            if rows is not None:
                self._observe_self(name, attn, hidden_states, inputs, rows, projected)
            return
        kind = self.kinds[name]
        call = LayerCall(hidden_states=hidden_states, encoder_hidden_states=inputs.get("encoder_hidden_states"),
                         attention_mask=inputs.get("attention_mask"), temb=inputs.get("temb"),
                         rotary=inputs.get("image_rotary_emb"), text_len=self._text_len)
        if rows is None or (call.encoder_hidden_states is None and not kind.joint):
            return
        if torch.is_grad_enabled():  # pipelines run without gradients; a decorator would cost every call
            with torch.no_grad():
                return self._observe_projected(name, attn, kind, call, rows, projected)
        self._observe_projected(name, attn, kind, call, rows, projected)

    def _observe_projected(self, name: str, attn, kind, call: LayerCall, rows: slice, projected: tuple) -> None:
        """:meth:`_observe` with the layer's own projections: buffer the conditional rows' queries."""
        q_out, k_out = projected
        if q_out is not None:  # the model's own to_q output: (n, N, inner) for the conditional rows
            h = kind.query_rows(q_out, call, rows)
        else:  # a processor that does not call to_q: project the query input here
            h = attn.to_q(kind.query_input(attn, call, rows))
        context, keys, bias = self._context_keys(name, attn, call, k_out)
        position = len(self._gen_meta["steps"]) - 1  # this step's row in the per-step buffers
        if self.config.joint_slice and kind.joint:  # the image keys the text competes with, in log2 units
            image_keys = kind.image_keys(attn, call, rows).float() * (kind.scale(attn) * LOG2E)
            self._compute(name, attn, h[None], context, keys, bias, call, [position], image_keys.contiguous())
            return
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
                self._compute(name, attn, h[None], context, keys, bias, call, [position])
                return
            buf = _StepBuffer(torch.empty((steps, *h.shape), dtype=h.dtype, device=h.device))
            self._buffers[name] = buf
        buf.rows[buf.count].copy_(h)
        buf.count += 1
        buf.positions.append(position)
        buf.attn, buf.context, buf.keys, buf.bias, buf.call = attn, context, keys, bias, call

    @torch.no_grad()
    def _observe_self(self, name: str, attn, hidden_states: Tensor, inputs: dict, rows: slice,
                      projected: tuple) -> None:
        """Add one step's head-mean self-attention affinities ``(N, N)`` of the conditional images."""
        q_out, k_out = projected
        if q_out is None or k_out is None:
            call = LayerCall(hidden_states=hidden_states, temb=inputs.get("temb"))
            h = _SELF.query_input(attn, call, rows)  # (n, N, dim)
            q_out, k_out = attn.to_q(h), attn.to_k(h)
        else:
            q_out, k_out = q_out[rows], k_out[rows]
        q = _SELF.head_queries(attn, q_out, None)  # (n, heads, N, head_dim)
        k = k_out.view(*k_out.shape[:-1], attn.heads, -1).transpose(-2, -3)  # the image tokens' own keys
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        probs = softmax_maps(k.float(), q.float(), float(attn.scale))  # (n, heads, N keys, N queries)
        affinity = probs.mean(1).transpose(-1, -2)  # (n, N queries, N keys): each row sums to 1
        slots = self._affinity.setdefault(name, [None] * self._images)
        for j in range(affinity.shape[0]):
            a = affinity[j].to(self.config.device)
            slots[j] = a.clone() if slots[j] is None else slots[j].add_(a)
        if name not in self._gen_meta.setdefault("self_attention_grids", {}):
            lh, lw = self._gen_meta["latent_size"]
            self._gen_meta["self_attention_grids"][name] = list(_layer_shape(lh, lw, affinity.shape[-1], name))

    def _flush(self, name: str | None = None) -> None:
        """Compute what the buffered steps of one layer (all layers when ``name`` is None) contribute."""
        for key in [name] if name is not None else list(self._buffers):
            buf = self._buffers.get(key)
            if buf is None or not buf.count:
                continue
            self._compute(key, buf.attn, buf.hidden[: buf.count], buf.context, buf.keys, buf.bias, buf.call,
                          buf.positions)
            buf.count, buf.positions, buf.context, buf.keys, buf.bias, buf.call = 0, [], None, None, None, None

    @torch.no_grad()
    def _compute(self, name: str, attn, h: Tensor, context: Tensor, keys: Tensor, bias: Tensor | None,
                 call: LayerCall, positions: list[int], image_keys: Tensor | None = None) -> None:
        """Hand ``k`` steps of one layer to the recorders; ``h`` is the query projection ``(k, n, N, inner)``,
        ``positions`` the steps' rows in the per-step buffers."""
        flat = h  # (k, n, N, inner) the model's query projection
        q = self.kinds[name].head_queries(attn, flat, call)  # (k, n, heads, N, head_dim)
        _, _, heads, pixels, head_dim = q.shape
        if name not in self._layer_info:
            self._layer_info[name] = self._describe(name, attn, pixels, heads, head_dim)
        batch = LayerBatch(name=name, attn=attn, info=self._layer_info[name], flat=flat, q=q, context=context,
                           keys=keys, positions=positions, bias=bias, image_keys=image_keys)
        if self._prob_users:
            for probs in probability_chunks(batch):  # (c, n, heads, T, N), a few steps at a time, in cache
                for recorder in self._prob_users:
                    recorder.add_probs(batch, probs)
        for recorder in self.recorders:
            recorder.add(batch)

    def _context_keys(self, name: str, attn, call: LayerCall,
                      projected: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
        """The conditional text states ``(n, T, D)`` to record, the keys ``(n, heads, T, head_dim)`` scaled by the
        layer's softmax scale and log2(e), and the score bias ``(n, T)`` in log2 units, computed once per
        generation while the pipeline passes the same, unmodified text tensor (a held reference, so its identity
        cannot be reused). Joint attention reads a new text stream every step; its record keeps the denoiser's
        text input."""
        source = call.encoder_hidden_states if call.encoder_hidden_states is not None else call.hidden_states
        cached = self._key_cache.get(name)
        if (cached is not None and cached[0] is source and cached[1] == source._version
                and cached[2] == self._rows):
            return cached[3], cached[4], cached[5]
        kind = self.kinds[name]
        states = kind.text_states(attn, call, self._rows)  # (n, T, D)
        if projected is not None:  # joint attention: the model's own key projection of this step's text
            k = kind.projected_keys(attn, kind.key_rows(projected, call, self._rows), call)
        else:
            k = kind.keys(attn, states, call, exact_module=True)  # (n, heads, T, head_dim)
        keys = (k.float() * (kind.scale(attn) * LOG2E)).contiguous()
        bias = kind.score_bias(call, self._rows)
        bias = None if bias is None else (bias * LOG2E).contiguous()  # (n, T)
        context = self._gen_text if kind.joint and self._gen_text is not None else states
        self._key_cache[name] = (source, source._version, self._rows, context, keys, bias)
        return context, keys, bias

    def _describe(self, name: str, attn, pixels: int, heads: int, head_dim: int) -> LayerInfo:
        """Geometry of a layer from the latent size of this generation and the layer's query count."""
        lh, lw = self._gen_meta["latent_size"]
        height, width = _layer_shape(lh, lw, pixels, name)
        kind = self.kinds[name]
        return LayerInfo(
            name=name, heads=heads, head_dim=head_dim, scale=kind.scale(attn), height=height, width=width,
            key_bias=attn.to_k.bias is not None, key_linear=kind.key_linear(attn),
        )

    def _to_record(self, finish: Finish, index: int, row: int) -> Record:
        """Build one image's record from the recorders' accumulators, with provenance."""
        meta = _jsonable(dict(self._gen_meta))
        meta["index"] = index
        meta.update(self.extra_meta)
        record = Record(meta=meta, layers=dict(finish.layers))
        for recorder in self.recorders:
            recorder.fill(record, row, finish)
        record.self_attention = {n: slots[row] for n, slots in self._affinity.items() if slots[row] is not None}
        meta.update(self._prompt_of(row))
        return record

    # -- naming prompts ----------------------------------------------------------------------------
    def _prompt_of(self, row: int) -> dict:
        """``prompt``, ``token_ids`` and ``tokens`` (the context's first token columns) and ``segments`` (every
        tokenizer's columns, e.g. SD3's CLIP then T5) of image ``row`` of the running generation, as far as known.

        What the text encoders were called with wins; a prompt named with ``trace(prompt=...)`` or :meth:`next`
        fills in when the pipeline was given ``prompt_embeds`` (and is checked against the encoders' calls when
        there are some)."""
        images = self._images
        text = self._gen_text[row] if self._gen_text is not None else None  # (T, D) the denoiser's text input
        seen = _captured_segments(self.pipe, self.adapter, self._text_calls, self._cfg, text, row, images)
        named = None
        if self.prompts is not None:
            k = row // (images // len(self.prompts))
            named = self._named_segments[k]
            if not seen or [s["token_ids"] for s in seen] == [s["token_ids"] for s in named[: len(seen)]]:
                return _prompt_meta(self.prompts[k], named)
            warnings.warn(
                f"the prompt named for this trace ({self.prompts[k]!r}) is not what the pipeline encoded "
                f"({_decode(self.pipe, seen[0])!r}); the record uses the encoded prompt. Name each "
                "call's prompt with tracer.next(prompt=...), or leave prompt= out", UserWarning, stacklevel=2)
        if not seen:
            return {}
        longest = max(seen, key=lambda segment: len(segment["token_ids"]))  # SD3: T5 reads past CLIP's 77
        return _prompt_meta(_decode(self.pipe, longest), seen)

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

        Examples:
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
            self._named_segments = [prompt_segments(self.pipe, p) for p in self.prompts]
        self.extra_meta = dict(meta or {})

    def pop_records(self) -> list[Record]:
        """The records made so far (as :attr:`records`), removed from the tracer to free their memory."""
        self._finish_generation()
        taken, self._records = self._records, []
        return taken


def _tokenizer_of(pipe, segment: str):
    """The tokenizer a context segment's columns come from (``"tokenizer"``, ``"tokenizer_2"``, ...)."""
    return getattr(pipe, segment)


def _segment(pipe, tokenizer_name: str, offset: int, ids: list[int]) -> dict:
    """One tokenizer's columns of the context: where they start, the ids and the token strings."""
    tokenizer = _tokenizer_of(pipe, tokenizer_name)
    return {"tokenizer": tokenizer_name, "offset": offset, "token_ids": ids,
            "tokens": tokenizer.convert_ids_to_tokens(ids)}


def _prompt_meta(prompt: str, segments: list[dict]) -> dict:
    """Record metadata naming a prompt: the first segment as ``token_ids``/``tokens``, all as ``segments``."""
    return {"prompt": prompt, "token_ids": segments[0]["token_ids"], "tokens": segments[0]["tokens"],
            "segments": segments}


def _decode(pipe, segment: dict) -> str:
    """The text of a segment's ids, without special tokens."""
    return _tokenizer_of(pipe, segment["tokenizer"]).decode(segment["token_ids"], skip_special_tokens=True).strip()


def prompt_segments(pipe, prompt: str) -> list[dict]:
    """Every segment of a prompt's token columns in the denoiser's text input: its ids and tokens from each
    tokenizer of the context, where its columns start (the first checked against the encoder's length limit).

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> [(s["tokenizer"], s["offset"], s["tokens"][1:3]) for s in prompt_segments(build_pipeline("tiny"), "a car")]
        [('tokenizer', 0, ['a</w>', 'car</w>'])]
    """
    names = adapter_for(pipe).text_segments(pipe)
    if len(names) == 1:  # one tokenizer reads the whole prompt: past its length the model would not see it
        ids, _ = tokenize_prompt(pipe, prompt, names[0])
    else:  # SD3: CLIP's columns are cut at 77, as the pipeline cuts them; T5's columns read on
        ids = getattr(pipe, names[0])(prompt, truncation=True).input_ids
    segments = [_segment(pipe, names[0], 0, ids)]
    offset = _tokenizer_of(pipe, names[0]).model_max_length
    for name in names[1:]:
        tokenizer = _tokenizer_of(pipe, name)
        segments.append(_segment(pipe, name, offset, tokenizer(prompt, truncation=True).input_ids))
        offset += tokenizer.model_max_length
    return segments


def _captured_segments(pipe, adapter, calls: list[TextCall], cfg: bool, text: Tensor | None, row: int,
                       images: int) -> list[dict]:
    """The segments of image ``row``'s conditional prompt, found among a generation's text encoder calls.

    A call one of whose states (last or hidden) holds the denoiser's text input at a segment's columns is that
    segment's. Where no state matches (a pipeline that transforms them, such as clip_skip's final norm), diffusers'
    order decides the first segment: the prompt is encoded before the negative prompt, so the first call is the
    prompt's unless guidance is on and there was only one call (then it may be the negative prompt's, with
    ``prompt_embeds`` given: unknown)."""
    names = adapter.text_segments(pipe)
    segments, offset = [], 0
    for name in names:
        encoder = _ENCODER_OF[name]
        found = None
        for call in (c for c in calls if c.encoder == encoder) if text is not None else ():
            for states in call.states:
                length, width = states.shape[-2:]
                if offset + length > text.shape[0] or width > text.shape[1]:
                    continue
                block = text[offset : offset + length, :width]
                match = [b for b in range(states.shape[0]) if torch.equal(states[b].float(), block.float())]
                if match:
                    found = call.input_ids[match[0]]
                    break
            if found is not None:
                break
        if found is None and not segments:
            first = [c for c in calls if c.encoder == encoder]
            if not first or (cfg and len(first) < 2):
                return []
            ids = first[0].input_ids
            found = ids[min(row // max(1, images // ids.shape[0]), ids.shape[0] - 1)]
        if found is None:
            break
        tokenizer = _tokenizer_of(pipe, name)
        segments.append(_segment(pipe, name, offset, _trim_ids(tokenizer, found)))
        offset += len(found)
    return segments


_ENCODER_OF = {"tokenizer": 0, "tokenizer_2": 1, "tokenizer_3": 2}
"""The text encoder each tokenizer feeds (``text_encoder``, ``text_encoder_2``, ``text_encoder_3``)."""


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
    """The layers whose names equal or start with one of ``selectors``, or that a preset names (all when None)."""
    if selectors is None:
        return dict(layers)
    if isinstance(selectors, str):
        selectors = [selectors]
    chosen = set(expand_layers(list(layers), selectors))
    return {n: layers[n] for n in layers if n in chosen}


def expand_layers(names: list[str], selectors: Sequence[str], listing: str = "valid layer names") -> list[str]:
    """The names (in model order) that equal or start with a selector, or that a preset of
    :func:`~opendaam.tracing.adapters.layer_presets` names.

    Raises:
        ValueError: a selector matches nothing; the message lists the presets and the layer names.

    Examples:
        >>> expand_layers(["down.a", "mid.b", "up.c"], ["late", "down"])
        ['down.a', 'up.c']
    """
    presets = layer_presets(names)
    chosen: set[str] = set()
    for sel in selectors:
        matched = presets.get(sel) or [n for n in names if n == sel or n.startswith(sel)]
        if not matched:
            raise ValueError(f"unknown layer {sel!r}; {listing}: {', '.join(names)} (or their prefixes); presets: "
                             f"{', '.join(presets)}")
        chosen.update(matched)
    return [n for n in names if n in chosen]


def tokenize_prompt(pipe, prompt: str, tokenizer: str = "tokenizer") -> tuple[list[int], list[str]]:
    """Token ids and strings of ``prompt`` (start and end included) by one of the pipeline's tokenizers; error
    past the encoder's length (77 tokens for CLIP).

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> tokenize_prompt(build_pipeline("tiny"), "a car")[1]
        ['<|startoftext|>', 'a</w>', 'car</w>', '<|endoftext|>']
    """
    tokenizer = getattr(pipe, tokenizer)
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

    Examples:
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
