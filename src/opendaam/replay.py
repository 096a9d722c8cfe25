"""Open-vocabulary maps in joint attention (SD3, SD3.5, Flux) by replaying recorded steps.

In MM-DiT models a word's keys in later blocks come from the text stream, which reads the image: cached queries
are not enough. But the image stream never reads words that were not in the prompt, so a new text X' can be run
again beside the *frozen* image stream of a generation: the denoiser is called at each recorded step with a
batch of two rows, the prompt's text and X', the same latent and conditioning; in every text-conditioned layer
the second row's image outputs are replaced by the first row's, so its image stream stays the generation's while
its text stream is X''s own. The tracer then records the second row's DAAM: the softmax of the generation's image
queries over X''s keys, layer by layer. With X' = the prompt this reproduces the generation's own maps.

The text stream's modulation keeps the generation's conditioning vector (timestep, guidance and the prompt's
pooled embedding): only the token sequence changes. Cost: one denoiser evaluation of batch 2 per replayed step.
Sits between tracing and heatmaps: imports :mod:`opendaam.tracing` only.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from opendaam.tracing import Record, adapter_for, trace
from opendaam.tracing.adapters import LayerCall
from opendaam.tracing.hooks import _RecordingProcessor, wrap_processor

__all__ = ["encode_prompt_states", "replay_daam", "token_maps"]


class _FrozenImages(_RecordingProcessor):
    """Runs the layer on both rows, then gives the second row the first row's image outputs."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        image = out[0] if isinstance(out, tuple) else out  # (2, N, dim); Flux single-stream: (2, T + N, dim)
        start = self.observe() if not isinstance(out, tuple) else 0  # single-stream: text rows come first
        image[1, start:] = image[0, start:]
        return out


@contextmanager
def _frozen_image_stream(denoiser, layers: list[str]) -> Iterator[None]:
    """Install :class:`_FrozenImages` on ``layers`` and a pre-hook that tells single-stream layers where the
    image rows start; restore both afterwards."""
    text_len = {"value": 0}

    def on_call(module, args, kwargs):
        text = kwargs.get("encoder_hidden_states")
        text_len["value"] = int(text.shape[1]) if isinstance(text, Tensor) else 0

    current = dict(denoiser.attn_processors)
    # the wrapper's observe slot gives it the text length of the running call
    frozen = {name: wrap_processor(current[name], name, lambda: text_len["value"], base=_FrozenImages)
              for name in layers}
    denoiser.set_attn_processor({**current, **frozen})
    handle = denoiser.register_forward_pre_hook(on_call, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        now = dict(denoiser.attn_processors)
        denoiser.set_attn_processor({n: frozen[n].inner if now[n] is frozen.get(n) else p for n, p in now.items()})


def encode_prompt_states(pipe, text: str, length: int) -> Tensor:
    """The denoiser's text input ``(length, D)`` for ``text``, encoded as the pipeline encodes a prompt (SD3: CLIP
    columns then T5; Flux: T5), padded to the record's ``length`` tokens.

    Raises:
        ValueError: the pipeline's family takes no replay.
    """
    from opendaam.tracing.hooks import quiet_text_hooks

    name = type(pipe.transformer).__name__ if hasattr(pipe, "transformer") else ""
    with torch.no_grad(), quiet_text_hooks():
        if name == "SD3Transformer2DModel":
            clip = pipe.tokenizer.model_max_length
            embeds = pipe.encode_prompt(text, text, text, device=pipe.transformer.device,
                                        do_classifier_free_guidance=False, max_sequence_length=length - clip)[0]
        elif name == "FluxTransformer2DModel":
            embeds = pipe.encode_prompt(text, text, device=pipe.transformer.device, max_sequence_length=length)[0]
        else:
            raise ValueError(f"{type(pipe).__name__} needs no replay: open-vocabulary maps come from its query cache")
    return embeds[0].float().cpu()


def replay_daam(record: Record, pipe, states: Tensor, layers: Sequence[str] | None = None,
                steps: Sequence[int] | None = None) -> dict[str, Tensor]:
    """DAAM of a new text's tokens in a recorded generation, per layer ``(heads, N, T)`` summed over the
    replayed steps.

    Args:
        record: a record traced with ``replay=True``.
        pipe: the pipeline that generated it.
        states: the new text's denoiser input ``(T, D)``, as long as the prompt's
            (:func:`encode_prompt_states`); the record's own ``context`` reproduces its DAAM.
        layers: layer names to record (default: the record's).
        steps: positions into the recorded steps to replay (default: all).

    Raises:
        ValueError: the record has no replay data, or ``states`` do not fit its prompt's shape.
    """
    if not record.replay:
        raise ValueError("this record has no replay data for open-vocabulary maps in joint attention; trace with "
                         "opendaam.trace(pipe, replay=True)")
    if record.context is None or tuple(states.shape) != tuple(record.context.shape):
        raise ValueError(f"the new text's states are {tuple(states.shape)}, the prompt's "
                         f"{None if record.context is None else tuple(record.context.shape)}: encode it padded to the "
                         "prompt's length")
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    names = list(layers) if layers is not None else list(record.layers)
    replay = record.replay
    positions = range(replay["hidden_states"].shape[0]) if steps is None else steps
    device, dtype = denoiser.device, denoiser.dtype
    text = torch.stack([record.context, states]).to(device, dtype)  # (2, T, D): the prompt, then X'
    constant = {}
    for key in ("pooled_projections", "guidance"):
        if key in replay:
            constant[key] = torch.stack([replay[key]] * 2).to(device, dtype)
    for key in ("img_ids", "txt_ids"):
        if key in replay:
            constant[key] = replay[key].to(device)
    with torch.no_grad(), _frozen_image_stream(denoiser, names), trace(pipe, layers=tuple(names)) as tracer:
        for i in positions:
            latent = replay["hidden_states"][i].to(device, dtype)
            timestep = replay["timestep"][i].to(device)
            denoiser(hidden_states=torch.stack([latent, latent]), encoder_hidden_states=text,
                     timestep=torch.stack([timestep, timestep]).to(dtype), return_dict=False, **constant)
    return tracer.records[-1].daam  # the second row: X' (the clock may or may not take the pair for guidance)


class _TokenMaps(_FrozenImages):
    """Frozen image stream, and the object map of the second row's first two text columns: at each text layer,
    the first row's image queries against them, ``sigmoid`` of the score difference summed over heads (the
    two-token softmax), differentiable in the text stream."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        maps, kind, text_len = self.observe()
        inputs = dict(zip(self.positional, args, strict=False))
        inputs.update(kwargs)
        call = LayerCall(hidden_states=hidden_states, encoder_hidden_states=inputs.get("encoder_hidden_states"),
                         attention_mask=inputs.get("attention_mask"), temb=inputs.get("temb"),
                         rotary=inputs.get("image_rotary_emb"), text_len=text_len)
        layer = kind[self.name]
        with torch.no_grad():  # the generation's image queries: constants
            flat = attn.to_q(layer.query_input(attn, call, slice(0, 1)))  # (1, N, inner)
            q = layer.head_queries(attn, flat, call).float()  # (1, H, N, d)
        k = layer.keys(attn, layer.text_states(attn, call, slice(1, 2)), call)  # (1, H, T, d), with gradient
        scores = torch.matmul(q, k[..., :2, :].transpose(-1, -2)) * layer.scale(attn)  # (1, H, N, 2)
        maps[self.name] = torch.sigmoid(scores[..., 0] - scores[..., 1]).sum((0, 1))  # (N,) object map
        out = self.inner(attn, hidden_states, *args, **kwargs)
        image = out[0] if isinstance(out, tuple) else out
        start = 0 if isinstance(out, tuple) else text_len
        rows = torch.cat([image[:1], torch.cat([image[1:, :start], image[:1, start:]], dim=1)])  # frozen images
        return (rows, *out[1:]) if isinstance(out, tuple) else rows


def token_maps(record: Record, pipe, x: Tensor, steps: Sequence[int] | None = None) -> Tensor:
    """Object and background maps ``(2, h * w)`` at latent size of a two-token text X' = [object, background]
    in a recorded joint-attention generation, summed over layers, heads and the replayed steps, differentiable in
    ``x`` ``(2, D)``: X' runs as the first two columns of a text of the prompt's length (the remaining columns
    are the empty prompt's, as any prompt's padding) beside the frozen image stream; each layer's object map is
    the two-token softmax of the generation's image queries over X''s keys there.

    Raises:
        ValueError: the record has no replay data.
    """
    from opendaam.attention import upsample

    if not record.replay:
        raise ValueError("optimizing a token in joint attention replays the generation: trace with "
                         "opendaam.trace(pipe, replay=True)")
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    device, dtype = denoiser.device, denoiser.dtype
    length = record.context.shape[0]
    padding = _empty_prompt(pipe, length)  # (T, D)
    text = torch.cat([x.to(device, dtype), padding[2:].to(device, dtype)])  # (T, D): X' then padding
    replay = record.replay
    constant = {key: torch.stack([replay[key]] * 2).to(device, dtype) for key in ("pooled_projections", "guidance")
                if key in replay}
    constant.update({key: replay[key].to(device) for key in ("img_ids", "txt_ids") if key in replay})
    names = list(record.layers)
    kinds = {n: adapter.kind(n, m) for n, m in adapter.layers(denoiser).items() if n in record.layers}
    maps: dict[str, Tensor] = {}
    text_len = {"value": length}
    current = dict(denoiser.attn_processors)
    wrappers = {n: wrap_processor(current[n], n, lambda: (maps, kinds, text_len["value"]), base=_TokenMaps)
                for n in names}
    h, w = record.latent_size
    mode = record.meta.get("trace_config", {}).get("upsample", "bicubic")
    total = None
    denoiser.set_attn_processor({**current, **wrappers})
    try:
        for i in range(replay["hidden_states"].shape[0]) if steps is None else steps:
            latent = replay["hidden_states"][i].to(device, dtype)
            timestep = replay["timestep"][i].to(device, dtype)
            denoiser(hidden_states=torch.stack([latent, latent]),
                     encoder_hidden_states=torch.stack([record.context.to(device, dtype), text]),
                     timestep=torch.stack([timestep, timestep]), return_dict=False, **constant)
            for name in names:
                info = record.layers[name]
                grid = maps.pop(name).float().reshape(1, info.height, info.width)
                up = upsample(grid, (h, w), mode).reshape(-1)  # (h*w,)
                total = up if total is None else total + up
    finally:
        now = dict(denoiser.attn_processors)
        denoiser.set_attn_processor({n: wrappers[n].inner if now[n] is wrappers.get(n) else p for n, p in now.items()})
    count = replay["hidden_states"].shape[0] if steps is None else len(steps)
    heads = sum(record.layers[n].heads for n in names)  # interpolation keeps constants: background = all - object
    return torch.stack([total, heads * count - total])  # (2, h*w): object, background


def _empty_prompt(pipe, length: int) -> Tensor:
    """The denoiser's text input for the empty prompt (its padding columns fill a token's text)."""
    return encode_prompt_states(pipe, "", length)
