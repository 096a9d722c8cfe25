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

from torch import Tensor, nn

__all__ = ["GenerationClock", "ProcessorHooks", "StepInfo", "TextCall", "TextEncoderHooks", "quiet_text_hooks"]

_QUIET = threading.local()


@contextmanager
def quiet_text_hooks() -> Iterator[None]:
    """Text encoder calls inside this block are not taken for a generation's prompt (opendaam's own encoding of
    new words between generations).

    Example:
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


class _RecordingProcessor:
    """Runs the original processor, then hands the layer's inputs to ``observe``."""

    def __init__(self, inner, name: str, observe: Callable):
        self.inner = inner
        self.name = name
        self.observe = observe

    def __call__(self, attn, hidden_states, *args, **kwargs):
        out = self.inner(attn, hidden_states, *args, **kwargs)
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        self.observe(self.name, attn, hidden_states, encoder_hidden_states, temb)
        return out


def wrap_processor(inner, name: str, observe: Callable):
    """A processor that runs ``inner`` unchanged, then calls ``observe``; its signature mirrors ``inner``'s
    (diffusers drops keyword arguments that a processor's signature does not name)."""
    base = _RecordingProcessor
    try:
        signature = inspect.signature(type(inner).__call__)
    except (TypeError, ValueError):
        return base(inner, name, observe)

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return base.__call__(self, attn, hidden_states, *args, **kwargs)

    __call__.__signature__ = signature
    cls = type(f"Recording{type(inner).__name__}", (base,), {"__call__": __call__})
    return cls(inner, name, observe)


class ProcessorHooks:
    """Wraps the processors of chosen layers and pre-hooks the denoiser; :meth:`remove` takes out exactly what
    it added. Removing twice is safe, and so is closing traces out of order: a wrapper of ours that a later
    trace wrapped again is cut out of that chain, so no recording processor is left behind."""

    def __init__(self, denoiser: nn.Module, layers: list[str], observe: Callable, on_call: Callable):
        self.denoiser = denoiser
        current = dict(denoiser.attn_processors)
        self.wrappers = {name: wrap_processor(current[name], name, observe) for name in layers}
        denoiser.set_attn_processor({**current, **self.wrappers})  # set_attn_processor consumes its dict
        self.handle = denoiser.register_forward_pre_hook(on_call, with_kwargs=True)

    def remove(self) -> None:
        """Remove the pre-hook and our wrappers; every other processor stays as it is now."""
        if self.handle is None:
            return
        self.handle.remove()
        self.handle = None
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
    step: int  # call index within the generation (0 = first)
    rows: slice | None  # the conditional rows to record, None when this step is not recorded


class GenerationClock:
    """Step and generation boundaries and the conditional rows, from the denoiser's calls.

    A new generation starts when the scheduler's timesteps tensor is another object (the pipeline called
    ``set_timesteps`` again) or the batch changes. With classifier-free guidance in one batch, the conditional
    rows are the second half (diffusers' order ``[uncond; cond]``).
    """

    def __init__(self, pipe, steps: tuple[int, ...] | None):
        self.pipe = pipe
        self.steps = steps
        self.timesteps = None
        self.expected = None  # batch of the running generation
        self.step = -1
        self.cfg = False
        self.images = 0

    def tick(self, sample: Tensor) -> StepInfo:
        """Advance by one denoiser call on ``sample`` ``(batch, ...)``."""
        timesteps = getattr(getattr(self.pipe, "scheduler", None), "timesteps", None)
        new = timesteps is not self.timesteps or self.expected is None or sample.shape[0] != self.expected
        if new:
            self.timesteps = timesteps
            self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))
            batch = sample.shape[0]
            if self.cfg and batch % 2:
                raise ValueError(f"classifier-free guidance with an odd denoiser batch ({batch}); cannot split it")
            self.images = batch // 2 if self.cfg else batch
            self.expected = batch
            self.step = -1
        self.step += 1
        recorded = self.steps is None or self.step in self.steps
        rows = slice(sample.shape[0] - self.images, sample.shape[0]) if recorded else None
        return StepInfo(new_generation=new, step=self.step, rows=rows)

    def end(self) -> None:
        """Forget the running generation (the next call starts a new one)."""
        self.expected = None


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
