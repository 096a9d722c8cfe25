"""Hook management, apart from what is recorded: wrapping attention processors and restoring them, the
denoiser's per-call pre-hook, step and generation boundaries, which batch rows are conditional, and the text
encoders' calls (to learn each generation's prompt).

Everything here attaches through diffusers' and torch's public extension points: attention processors keyed by
layer name (``set_attn_processor``) and module forward hooks. A wrapped processor runs the original one
unchanged, so images come out bit-identical.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["GenerationClock", "ProcessorHooks", "StepInfo", "TextCall", "TextEncoderHooks", "quiet_text_hooks",
           "wrap_processor"]

_QUIET = threading.local()


@contextmanager
def quiet_text_hooks() -> Iterator[None]:
    """Text encoder calls inside this block are not taken for a generation's prompt (opendaam's own encoding of
    new words between generations).

    Examples:
        >>> with quiet_text_hooks():
        ...     _quiet()
        True
    """
    _QUIET.depth = getattr(_QUIET, "depth", 0) + 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


def _quiet() -> bool:
    """Whether this thread is inside :func:`quiet_text_hooks`."""
    return getattr(_QUIET, "depth", 0) > 0


_CALL_NAMES = ("encoder_hidden_states", "attention_mask", "temb", "image_rotary_emb")
"""Processor arguments a recorder may read besides ``attn`` and ``hidden_states``."""


class _RecordingProcessor:
    """Runs the original processor, then hands the layer's inputs (by name) to ``observe``."""

    positional: tuple[str, ...] = ("encoder_hidden_states", "attention_mask", "temb")  # AttnProcessor2_0's order

    def __init__(self, inner, name: str, observe: Callable):
        self.inner = inner
        self.name = name
        self.observe = observe

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        inputs = {k: kwargs[k] for k in _CALL_NAMES if k in kwargs}
        inputs.update((k, v) for k, v in zip(self.positional, args, strict=False) if k in _CALL_NAMES)
        self.observe(self.name, attn, hidden_states, inputs)
        return out


def wrap_processor(inner, name: str, observe: Callable, base: type | None = None):
    """A processor that runs ``inner`` unchanged, then calls ``observe(name, attn, hidden_states, inputs)``; its
    signature mirrors ``inner``'s (diffusers drops keyword arguments that a processor's signature does not name),
    and positional arguments are read by the names ``inner`` gives them. ``base`` may be a subclass of the
    recording processor that does more around the call."""
    base = base or _RecordingProcessor
    try:
        signature = inspect.signature(type(inner).__call__)
    except (TypeError, ValueError):
        return base(inner, name, observe)
    params = [p for p in signature.parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)][3:]  # after self, attn, hidden_states

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return base.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"{base.__name__.strip('_')}{type(inner).__name__}", (base,), {"__call__": __call__,
                                                              "positional": tuple(p.name for p in params)})
    return cls(inner, name, observe)


class ProcessorHooks:
    """Wraps the processors of chosen layers and pre-hooks the denoiser; :meth:`remove` takes out exactly what
    it added. Removing twice is safe, and so is closing traces out of order: a wrapper of ours that a later
    trace wrapped again is cut out of that chain, so no recording processor is left behind."""

    def __init__(self, denoiser: nn.Module, layers: list[str], observe: Callable, on_call: Callable,
                 capture: dict[str, list[nn.Module | None]] | None = None):
        self.denoiser = denoiser
        current = dict(denoiser.attn_processors)
        self.wrappers = {name: wrap_processor(current[name], name, observe) for name in layers}
        denoiser.set_attn_processor({**current, **self.wrappers})  # set_attn_processor consumes its dict
        self.handle = denoiser.register_forward_pre_hook(on_call, with_kwargs=True)
        # outputs of the layers' own projections (to_q, ...), taken by the observer right after the processor
        # returns, so that the tracer reads the queries the model computed instead of computing them again
        self.captured: dict[tuple[str, int], Tensor] = {}
        self.projection_handles = [
            module.register_forward_hook(self._keep(name, i))
            for name, modules in (capture or {}).items() for i, module in enumerate(modules) if module is not None]

    def _keep(self, name: str, index: int):
        def hook(module, args, output):
            self.captured[(name, index)] = output
        return hook

    def take(self, name: str, index: int) -> Tensor | None:
        """The output of projection ``index`` of layer ``name`` in its last call, handed over once."""
        return self.captured.pop((name, index), None)

    def remove(self) -> None:
        """Remove the pre-hook and our wrappers; every other processor stays as it is now."""
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
        for handle in self.projection_handles:
            handle.remove()
        self.projection_handles, self.captured = [], {}
        current = dict(self.denoiser.attn_processors)
        self.denoiser.set_attn_processor({name: _without(proc, self.wrappers.get(name))
                                          for name, proc in current.items()})


def _without(proc, ours):
    """``proc`` with the wrapper ``ours`` taken out of its chain of wrappers (unchanged if it is not there)."""
    if ours is None:
        return proc
    if proc is ours:
        return ours.inner
    node = proc
    while isinstance(node, _RecordingProcessor):
        if node.inner is ours:
            node.inner = ours.inner
            return proc
        node = node.inner
    return proc


@dataclass(frozen=True)
class StepInfo:
    """What the clock says of one denoiser call."""

    new_generation: bool  # the call starts a new pipeline call (new timesteps, or another batch)
    step: int  # step index within the generation (0 = first)
    rows: slice | None  # the conditional rows to record, None when this call is not recorded
    branch: str = "conditional"  # "unconditional" for true CFG's second call of a step


class GenerationClock:
    """Step and generation boundaries and the conditional rows, from the denoiser's calls.

    A new generation starts when the scheduler's timesteps tensor is another object (the pipeline called
    ``set_timesteps`` again) or the batch changes. With classifier-free guidance in one batch, the conditional
    rows are the second half (diffusers' order ``[uncond; cond]``); pipelines that do not say whether they guide
    (PixArt, Flux) guide in one batch exactly when its two halves hold the same latents. A second call at the same
    timestep is true CFG's unconditional branch in families that call the denoiser once per branch (Flux calls the
    conditional branch first): not a step, not recorded. (Elsewhere a repeated timestep is a step of its own: Heun's
    scheduler evaluates each timestep twice.)
    """

    def __init__(self, pipe, steps: tuple[int, ...] | None, branches: bool = False):
        self.pipe = pipe
        self.steps = steps
        self.branches = branches  # the family may call the denoiser once per guidance branch (Flux true CFG)
        self.timesteps = None
        self.expected = None  # batch of the running generation
        self.step = -1
        self.cfg = False
        self.images = 0
        self.last_t = None  # timestep of the previous call

    def tick(self, sample: Tensor, t: float | None = None) -> StepInfo:
        """Advance by one denoiser call on ``sample`` ``(batch, ...)`` at timestep ``t``."""
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        new = timesteps is not self.timesteps or self.expected is None or sample.shape[0] != self.expected
        if new:
            self.timesteps = timesteps
            batch = sample.shape[0]
            self.cfg = _guides_in_batch(self.pipe, sample)
            if self.cfg and batch % 2:
                raise ValueError(f"classifier-free guidance with an odd denoiser batch ({batch}); cannot split it")
            self.images = batch // 2 if self.cfg else batch
            self.expected = batch
            self.step = -1
        elif self.branches and t is not None and t == self.last_t:  # true CFG: the step's unconditional branch
            return StepInfo(new_generation=False, step=self.step, rows=None, branch="unconditional")
        self.last_t = t
        self.step += 1
        recorded = self.steps is None or self.step in self.steps
        rows = slice(sample.shape[0] - self.images, sample.shape[0]) if recorded else None
        return StepInfo(new_generation=new, step=self.step, rows=rows)

    def end(self) -> None:
        """Forget the running generation (the next call starts a new one)."""
        self.expected = None
        self.last_t = None


def _guides_in_batch(pipe, sample: Tensor) -> bool:
    """Whether the pipeline runs classifier-free guidance in one batch ``[uncond; cond]``."""
    says = getattr(type(pipe), "do_classifier_free_guidance", None)
    if isinstance(says, property):
        return bool(pipe.do_classifier_free_guidance)
    half = sample.shape[0] // 2
    return sample.shape[0] % 2 == 0 and half > 0 and torch.equal(sample[:half], sample[half:])


@dataclass
class TextCall:
    """One call of a text encoder: its token ids and its first output (the text states)."""

    encoder: int  # 0 for ``pipe.text_encoder``, 1 for ``text_encoder_2``, ...
    input_ids: Tensor  # (batch, tokens)
    states: list[Tensor] = field(default_factory=list)  # (batch, tokens, width) each: last and hidden states


class TextEncoderHooks:
    """Forward hooks on the pipeline's text encoders that keep each call's token ids and output states, so the
    tracer knows every generation's prompt without being told."""

    def __init__(self, pipe):
        self.calls: list[TextCall] = []
        self.handles = []
        for i, name in enumerate(("text_encoder", "text_encoder_2", "text_encoder_3")):
            encoder = getattr(pipe, name, None)
            if isinstance(encoder, nn.Module):
                self.handles.append(encoder.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, Tensor) or _quiet():
                return
            # the pipeline builds its context from the last state (SD 1/2) or a hidden state (SDXL, clip_skip)
            first = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
            hidden = getattr(output, "hidden_states", None) or ()
            states = [t.detach() for t in (first, *hidden) if isinstance(t, Tensor) and t.ndim == 3]
            self.calls.append(TextCall(index, ids.detach().cpu(), states))
        return hook

    def take(self) -> list[TextCall]:
        """The calls since the last :meth:`take`, oldest first."""
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.calls = []
