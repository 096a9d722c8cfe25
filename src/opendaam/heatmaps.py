"""Word-to-pixel maps from a record: one verb, :func:`heatmaps`, for every method.

* ``daam``: the softmax cross-attention of the generating prompt's tokens, summed over layers, heads and
  steps (Tang et al., thesis eq. 3.3);
* ``open_vocab``: the same softmax for the keys of ANY prompt X' against the cached queries (eq. 3.6);
* ``linear``: no softmax, one token embedding x at a time: ``M x`` (eq. 3.8).

Maps are pure functions of (record, text or embedding), differentiable in the embedding. Each method is a
small object in one registry, :data:`METHODS`. Fourth layer of opendaam: imports :mod:`opendaam.attention`,
:mod:`opendaam.tracing`, :mod:`opendaam.cache` and the pure functions of :mod:`opendaam.metrics` (which
imports nothing of opendaam).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from opendaam.attention import key_weight, softmax_maps, text_keys, upsample
from opendaam.cache import queries, select_heads, select_layers, select_steps
from opendaam.metrics import normalize_maps
from opendaam.tracing import Record, adapter_for, tokenize_prompt
from opendaam.tracing.tracer import prompt_segments

__all__ = [
    "METHODS",
    "Heatmaps",
    "Method",
    "get_method",
    "colorize",
    "encode_text",
    "find_tokens",
    "heatmaps",
    "prompt_words",
]

START_NAMES = ("<sot>", "<|startoftext|>", "<start>")
END_NAMES = ("<eot>", "<|endoftext|>", "<end>")


@dataclass
class Heatmaps:
    """Soft maps for a list of labels (words, tokens or embeddings), at latent and image size.

    Attributes:
        latent: ``(labels, h, w)`` maps at the latent size the U-Net denoised.
        labels: one name per map (the word, or ``"embedding[i]"``).
        token_indices: per label, the token positions pooled into its map (empty for raw embeddings).
        method: the method that made them.
        image_size: ``(H, W)`` of the generated image.
        mode: interpolation used to reach image size.
    """

    latent: Tensor
    labels: list[str]
    token_indices: list[list[int]] = field(default_factory=list)
    method: str = "daam"
    image_size: tuple[int, int] = (0, 0)
    mode: str = "bicubic"

    @property
    def soft(self) -> Tensor:
        """``(labels, H, W)`` maps upsampled to image size."""
        return upsample(self.latent, self.image_size, self.mode)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, label: str | int) -> Tensor:
        """The ``(H, W)`` image-size map of one label (by name or position)."""
        return self.soft[self._index(label)]

    def _index(self, label: str | int) -> int:
        """Position of ``label`` in :attr:`labels`."""
        if isinstance(label, int):
            return label
        if label not in self.labels:
            raise KeyError(f"no map named {label!r}; maps: {', '.join(self.labels)}")
        return self.labels.index(label)

    def normalized(self, kind: str | None = None, size: str = "image") -> Tensor:
        """Maps scaled to [0, 1] per label: ``"max"`` divides by the maximum (DAAM's eq. 3.4), ``"minmax"``
        subtracts the minimum first (the thesis' choice for linear maps, which can be negative).

        The default is ``"minmax"`` for ``linear`` and ``"max"`` otherwise.
        """
        maps = self.soft if size == "image" else self.latent
        return normalize_maps(maps, kind or get_method(self.method).normalization)

    def masks(self, tau: float = 0.4, kind: str | None = None, size: str = "image") -> Tensor:
        """Binary masks ``normalized >= tau`` (``map >= tau * max`` for DAAM), ``(labels, H, W)`` bool.

        Examples:
            >>> maps = Heatmaps(torch.tensor([[[0.0, 1.0], [2.0, 4.0]]]), ["car"], image_size=(2, 2))
            >>> maps.masks(0.5).int().tolist()
            [[[0, 0], [1, 1]]]
        """
        if not 0.0 <= tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], not {tau}")
        return self.normalized(kind, size) >= tau

    def overlay(self, image, label: str | int = 0, alpha: float = 0.5) -> Image.Image:
        """The image with one label's normalized map blended over it in a jet colormap."""
        base = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
        base = base.convert("RGB")
        heat = self.normalized()[self._index(label)].detach().float().cpu().numpy()
        colour = Image.fromarray(colorize(heat)).resize(base.size, Image.BILINEAR)
        return Image.blend(base, colour, alpha)

    def plot(self, label: str | int = 0, image=None, ax=None, alpha: float = 0.5, colorbar: bool = True):
        """Draw one label's map (normalized, at image size) on a matplotlib axis, over ``image`` if given, as
        DAAM's ``plot_overlay`` does; returns the axis. Needs ``pip install 'opendaam[eval]'``.

        Examples:
            >>> maps = Heatmaps(torch.rand(1, 4, 4), ["car"], image_size=(8, 8))
            >>> maps.plot("car").get_title()  # doctest: +SKIP
            'car (daam)'
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:
            raise ImportError("plotting needs matplotlib: pip install 'opendaam[eval]'") from error
        if ax is None:
            _, ax = plt.subplots()
        index = self._index(label)
        heat = self.normalized()[index].detach().float().cpu().numpy()  # (H, W) in [0, 1]
        if image is not None:
            ax.imshow(np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image))
        shown = ax.imshow(heat, cmap="jet", alpha=alpha if image is not None else 1.0, vmin=0.0, vmax=1.0,
                          extent=(-0.5, self.image_size[1] - 0.5, self.image_size[0] - 0.5, -0.5))
        if colorbar:
            ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(f"{self.labels[index]} ({self.method})")
        ax.set_axis_off()
        return ax


def colorize(values: np.ndarray) -> np.ndarray:
    """A ``(H, W)`` array in [0, 1] as ``(H, W, 3)`` uint8 jet colours.

    Examples:
        >>> colorize(np.array([[0.0, 1.0]])).tolist()
        [[[0, 0, 127], [127, 0, 0]]]
    """
    x = np.clip(values, 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # red, green, blue peaks along 4x
    rgb = np.clip(1.5 - np.abs(4.0 * x - centres), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


# -- words and tokens ----------------------------------------------------------------------------


def _byte_chars() -> dict[int, str]:
    """CLIP's byte-to-character table (bytes are shown as printable stand-ins in its tokens)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return table


_BYTES = _byte_chars()


def _as_token_text(word: str) -> str:
    """A word written the way CLIP's byte-level tokens spell it (lower case)."""
    return "".join(_BYTES[b] for b in word.lower().encode("utf-8"))


_SENTENCEPIECE_SPECIALS = ("</s>", "<pad>", "<unk>", "<s>")
"""T5's special tokens (SentencePiece marks a word's first piece with "▁" instead of CLIP's "</w>" at its end)."""


def _sentencepiece(tokens: Sequence[str]) -> bool:
    """Whether ``tokens`` come from a SentencePiece tokenizer (T5) rather than CLIP's BPE."""
    return not any(t.endswith("</w>") for t in tokens) and any(t.startswith("\u2581") for t in tokens)


def prompt_words(tokens: Sequence[str]) -> list[tuple[str, list[int]]]:
    """The words of a tokenized prompt with the token positions of each (pieces joined): CLIP's byte-level BPE
    (``"</w>"`` ends a word) or T5's SentencePiece (``"\u2581"`` starts one).

    Examples:
        >>> prompt_words(["<|startoftext|>", "a</w>", "sky", "scraper</w>", "<|endoftext|>"])
        [('a', [1]), ('skyscraper', [2, 3])]
        >>> prompt_words(["\u2581a", "\u2581sky", "scraper", "</s>"])
        [('a', [0]), ('skyscraper', [1, 2])]
    """
    if _sentencepiece(tokens):
        words: list[tuple[str, list[int]]] = []
        for i, token in enumerate(tokens):
            if token in _SENTENCEPIECE_SPECIALS:
                continue
            if token.startswith("\u2581") or not words:
                words.append((token.lstrip("\u2581"), [i]))
            else:
                words[-1] = (words[-1][0] + token, words[-1][1] + [i])
        return [(w.lower(), pos) for w, pos in words if w]
    words, pieces, positions = [], [], []
    for i, token in enumerate(tokens):
        if token.startswith("<|") and token.endswith("|>"):
            continue
        pieces.append(token[:-4] if token.endswith("</w>") else token)
        positions.append(i)
        if token.endswith("</w>"):
            words.append(("".join(pieces), positions))
            pieces, positions = [], []
    if pieces:
        words.append(("".join(pieces), positions))
    return words


def _end_index(tokens: Sequence[str]) -> int:
    """Position of the end-of-text token (the last token when none is marked)."""
    for i, token in enumerate(tokens):
        if (i > 0 and token == "<|endoftext|>") or token == "</s>":
            return i
    return len(tokens) - 1


_CLIP_WORD = re.compile(r"[^\W\d_]+|\d|[^\s\w]+")
"""How CLIP's tokenizer splits text into words before byte-pair encoding: letter runs, single digits, punctuation."""


def find_tokens(tokens: Sequence[str], word: str) -> list[int]:
    """Token positions of ``word`` (one or more words, e.g. ``"traffic light"``) in a tokenized prompt.

    Every occurrence counts. ``"<sot>"`` and ``"<eot>"`` name the start and end tokens.

    Raises:
        KeyError: the word is not in the prompt; the message lists the prompt's words.

    Examples:
        >>> toks = ["<|startoftext|>", "a</w>", "traffic</w>", "light</w>", "<|endoftext|>"]
        >>> find_tokens(toks, "traffic light"), find_tokens(toks, "<eot>")
        ([2, 3], [4])
        >>> find_tokens(["<|startoftext|>", "a</w>", "car</w>", ",</w>", "<|endoftext|>"], "car,")
        [2, 3]
    """
    key = word.strip().lower()
    if key in START_NAMES:
        if _sentencepiece(tokens):
            raise KeyError(f"{word!r}: this tokenizer (SentencePiece, T5) puts no start token before the prompt")
        return [0]
    if key in END_NAMES:
        return [_end_index(tokens)]
    # CLIP splits letters, digits and punctuation into words of their own ("car," is "car" then ",")
    wanted = key.split() if _sentencepiece(tokens) else [_as_token_text(w) for w in _CLIP_WORD.findall(key)]
    words = prompt_words(tokens)
    found: list[int] = []
    for start in range(len(words) - len(wanted) + 1):
        if [w for w, _ in words[start : start + len(wanted)]] == wanted:
            for _, pos in words[start : start + len(wanted)]:
                found.extend(pos)
    if not found:
        listed = ", ".join(w for w, _ in words)
        raise KeyError(
            f"{word!r} is not in the prompt; its words are: {listed} (and <sot>, <eot>). For other words "
            "use method='open_vocab' or method='linear'"
        )
    return found


def encode_text(pipe, text: str, length: int | None = None) -> tuple[Tensor, list[str]]:
    """The ``(T, text_dim)`` text states the denoiser's attention layers read for ``text``, encoded and padded as
    the pipeline encodes its prompt (SDXL: both CLIP encoders; PixArt: T5 and the caption projection), and the
    text's tokens.

    Raises:
        ValueError: the text has more tokens than the encoder reads, or the family cannot encode new text.

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> pipe = build_pipeline("tiny")
        >>> states, tokens = encode_text(pipe, "a car")
        >>> tuple(states.shape), tokens
        ((77, 32), ['<|startoftext|>', 'a</w>', 'car</w>', '<|endoftext|>'])
        >>> torch.equal(states, pipe.encode_prompt("a car", "cpu", 1, False)[0][0])
        True
    """
    encoded, tokens = _encode(pipe, text, length)
    return encoded.states[0], tokens


def _encode(pipe, text: str, length: int | None = None):
    """:class:`~opendaam.tracing.adapters.EncodedText` of one text and its tokens (by the context's first
    tokenizer)."""
    adapter = adapter_for(pipe)
    _, tokens = tokenize_prompt(pipe, text, adapter.text_segments(pipe)[0])
    return adapter.encode(pipe, [text], length), tokens


# -- query parsing -----------------------------------------------------------------------------------


@dataclass
class _Item:
    """One requested map: a label and either a word, token indices or an embedding."""

    label: str
    word: str | None = None
    indices: list[int] | None = None
    embedding: Tensor | None = None  # (k, text_dim): k vectors pooled into one map
    use: list[int] | None = None  # rows of ``embedding`` whose maps make this label (None: all of them)


def _parse(query) -> list[_Item]:
    """Normalize the many accepted query forms into a list of items."""
    if query is None:
        return []
    if isinstance(query, (str, int)) or isinstance(query, Tensor) or hasattr(query, "embedding"):
        query = [query]
    if isinstance(query, Tensor):
        query = [query]
    items = []
    for i, q in enumerate(query):
        if isinstance(q, str):
            items.append(_Item(label=q, word=q))
        elif isinstance(q, int):
            items.append(_Item(label=f"token[{q}]", indices=[q]))
        elif isinstance(q, Tensor):
            if q.ndim == 1:
                items.append(_Item(label=f"embedding[{i}]", embedding=q[None]))
            elif q.ndim == 2:
                items.extend(_Item(label=f"embedding[{i + j}]", embedding=row[None]) for j, row in enumerate(q))
            else:
                raise ValueError(f"an embedding must be (text_dim,) or (k, text_dim), got shape {tuple(q.shape)}")
        elif hasattr(q, "embedding"):  # an optimized token: its first row is the object, others context
            emb = q.embedding.detach()
            emb = emb if emb.ndim == 2 else emb[None]
            items.append(_Item(label=getattr(q, "label", None) or f"token[{i}]", embedding=emb, use=[0]))
        else:
            raise TypeError(f"cannot make a map for {type(q).__name__}; give words, token indices or tensors")
    return items


def _need_tokens(record: Record) -> list[str]:
    """The record's prompt tokens, or a clear error."""
    if not record.tokens:
        raise ValueError(
            "the record does not know its prompt's words (the pipeline was given prompt_embeds, so no prompt was "
            "encoded): name the prompt the embeddings came from with opendaam.trace(pipe, prompt=...) or "
            "tracer.next(prompt=...), or ask for token indices (integers) instead of words"
        )
    return record.tokens


def _need_pipe(pipe, why: str):
    """``pipe``, or an error saying what it is needed for."""
    if pipe is None:
        raise ValueError(f"{why} needs the pipeline's text encoder and attention keys: pass pipe=...")
    return pipe


def _key_modules(pipe, record: Record, names: list[str]) -> dict:
    """The attention modules of ``pipe`` for the record's layers, checked to be the same model."""
    adapter = adapter_for(pipe)
    denoiser = adapter.denoiser(pipe)
    modules = adapter.layers(denoiser)
    text_dim = adapter.text_dim(denoiser)
    if record.meta.get("text_dim") not in (None, text_dim):
        raise ValueError(
            f"the record was made by a model with text width {record.meta['text_dim']}, the pipeline's is "
            f"{text_dim}: use the pipeline that generated it ({record.meta.get('model')})"
        )
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"the pipeline has no layers {missing}: use the model that made the record")
    return {n: modules[n] for n in names}


# -- methods -----------------------------------------------------------------------------------------------


@dataclass
class _Request:
    """Everything a method needs besides the record."""

    items: list[_Item]
    pipe: object
    context: str | Tensor | None
    layers: list[str]
    positions: list[int] | None
    heads: object
    softmax_over: str
    pooling: str


def _pool(columns: Tensor, groups: list[list[int]], pooling: str) -> Tensor:
    """Pool ``(J, h, w)`` per-token maps into one map per group of column positions."""
    out = []
    for g in groups:
        part = columns[g]
        out.append(part.mean(0) if pooling == "mean" else part.sum(0))
    return torch.stack(out)  # (labels, h, w)


def _to_latent(per_layer: dict[str, Tensor], record: Record) -> Tensor:
    """Sum ``(J, N_l)`` layer maps after interpolating each to latent size; returns ``(J, h, w)``."""
    size = record.latent_size
    mode = record.meta.get("trace_config", {}).get("upsample", "bicubic")
    total = None
    for name, maps in per_layer.items():
        info = record.layers[name]
        grid = maps.reshape(maps.shape[0], info.height, info.width)  # (J, hl, wl)
        up = upsample(grid, size, mode)  # (J, h, w)
        total = up if total is None else total + up
    return total


def _unique_columns(groups: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Distinct token columns and, per group, positions into that list."""
    columns = sorted({i for g in groups for i in g})
    where = {c: i for i, c in enumerate(columns)}
    return columns, [[where[i] for i in g] for g in groups]


def _daam(record: Record, req: _Request) -> tuple[Tensor, list[list[int]]]:
    """DAAM: recorded softmax probabilities of the generating prompt's tokens."""
    items = req.items or _all_token_items(record)
    groups = [it.indices if it.indices is not None else _word_indices(record, it) for it in items]
    if any(it.embedding is not None for it in items):
        raise ValueError("method='daam' maps the generating prompt's tokens; use 'linear' or 'open_vocab' "
                         "for embeddings")
    columns, local = _unique_columns(groups)
    per_layer = {}
    if req.positions is None:
        if not record.daam:
            raise ValueError("this record has no DAAM sums; trace with opendaam.trace(pipe, daam=True)")
        for name in req.layers:
            probs = record.daam[name]  # (heads, N, 77)
            hs = select_heads(record.layers[name], req.heads)
            probs = probs if hs is None else probs[hs]
            per_layer[name] = probs.sum(0)[:, columns].T  # (J, N)
    elif record.daam_steps:
        for name in req.layers:
            probs = record.daam_steps[name][req.positions].float()  # (S', heads, N, 77)
            hs = select_heads(record.layers[name], req.heads)
            probs = probs if hs is None else probs[:, hs]
            per_layer[name] = probs.sum((0, 1))[:, columns].T  # (J, N)
    else:
        if record.context is None or not record.queries:
            raise ValueError("per-step DAAM needs daam_per_step=True or queries=True when tracing")
        pipe = _need_pipe(req.pipe, "per-step DAAM from the query cache")
        modules = _key_modules(pipe, record, req.layers)
        per_layer = _softmax_maps(record, req, modules, record.context, columns, domain=None,
                                  bias=_record_bias(record))
    latent = _to_latent(per_layer, record)
    return _pool(latent, local, req.pooling), groups


def _all_token_items(record: Record) -> list[_Item]:
    """One item per token of the generating prompt, start and end included."""
    tokens = _need_tokens(record)
    return [_Item(label=t, indices=[i]) for i, t in enumerate(tokens)]


def _word_indices(record: Record, item: _Item) -> list[int]:
    """Token columns of an item's word in the record's prompt: in every tokenizer's segment of the context (SD3:
    its CLIP columns and its T5 columns, which start after CLIP's 77)."""
    tokens = _need_tokens(record)
    try:
        return segment_columns(tokens, record.meta.get("segments", []), item.word)
    except KeyError as error:
        raise KeyError(f"{error.args[0]} (prompt: {record.meta.get('prompt')!r})") from None


def segment_columns(tokens: list[str], segments: list[dict], word: str) -> list[int]:
    """A word's columns in the first tokenizer's ``tokens`` and in every further segment (offset by its start).

    Examples:
        >>> clip = ["<|startoftext|>", "a</w>", "car</w>", "<|endoftext|>"]
        >>> segment_columns(clip, [{}, {"offset": 77, "tokens": ["\u2581a", "\u2581car", "</s>"]}], "car")
        [2, 78]
    """
    try:
        found = find_tokens(tokens, word)
    except KeyError as error:  # SD3: CLIP's 77 columns may have cut the word off; T5's may still hold it
        found, missing = [], error
    for segment in segments[1:]:
        try:
            found += [segment["offset"] + i for i in find_tokens(segment["tokens"], word)]
        except KeyError:
            continue  # <sot> exists in CLIP's columns only
    if not found:
        raise missing
    return found


def _cache_queries(record: Record) -> Callable[[str, list[int]], Tensor]:
    """Reads ``(s, heads, N, head_dim)`` float32 queries of chosen steps from the record's cache."""
    return lambda name, steps: queries(record, name, steps)


def _softmax_maps(record: Record, req: _Request, modules: dict, states: Tensor, columns: list[int],
                  domain: int | None, provider: Callable[[str, list[int]], Tensor] | None = None,
                  bias: Tensor | None = None) -> dict[str, Tensor]:
    """Per layer ``(J, N)``: softmax attention of cached queries over the keys of ``states`` (first ``domain``
    rows when given), summed over the chosen steps and heads, for token ``columns``; ``bias`` ``(T,)`` is added
    to the scores (PixArt's padding).

    ``provider(layer, steps)`` gives ``(s, heads, N, head_dim)`` queries (default: the record's cache).
    """
    states = states[:domain] if domain is not None else states
    bias = bias[: states.shape[0]] if bias is not None else None
    provider = provider or _cache_queries(record)
    out = {}
    for name in req.layers:
        info = record.layers[name]
        if name not in record.queries:
            queries(record, name)  # raises the explanatory error
        k = text_keys(modules[name], states)  # (heads, T, head_dim)
        hs = select_heads(info, req.heads)
        if hs is not None:
            k = k[hs]
        steps = req.positions if req.positions is not None else list(range(record.queries[name].shape[0]))
        acc = None
        chunk = max(1, int(2**24 // max(1, info.pixels * info.heads * k.shape[1])))
        for start in range(0, len(steps), chunk):
            q = provider(name, steps[start : start + chunk])  # (s, heads, N, head_dim)
            if hs is not None:
                q = q[:, hs]
            probs = softmax_maps(k, q, info.scale, bias)  # (s, heads, T, N)
            part = probs[:, :, columns].sum((0, 1))  # (J, N)
            acc = part if acc is None else acc + part
        out[name] = acc  # (J, N)
    return out


def _open_vocab(record: Record, req: _Request) -> tuple[Tensor, list[list[int]]]:
    """Open-vocabulary DAAM: cached queries against the keys of a context prompt X' (eq. 3.5-3.6)."""
    items = req.items
    embed_items = [it for it in items if it.embedding is not None]
    if embed_items and len(embed_items) != len(items):
        raise ValueError("open_vocab takes either words (with a context prompt) or embeddings, not both")
    if len(items) > 1 and any(it.use is not None for it in items):
        # each optimized token brings its own context tokens: one softmax per token set
        parts = [_open_vocab(record, _replace_items(req, [it])) for it in items]
        return torch.cat([p[0] for p in parts]), [g for p in parts for g in p[1]]
    if embed_items:
        states = torch.cat([it.embedding for it in embed_items]).float()  # (T', text_dim)
        groups, row = [], 0
        for it in embed_items:
            rows = it.use if it.use is not None else range(it.embedding.shape[0])
            groups.append([row + r for r in rows])
            row += it.embedding.shape[0]
        domain, bias = None, None
    else:
        states, tokens, bias = _context_states(record, req)
        groups = [it.indices if it.indices is not None else find_tokens(tokens, it.word) for it in items] \
            if items else [[i] for i in range(len(tokens))]
        if not items:
            req.items = [_Item(label=t, indices=[i]) for i, t in enumerate(tokens)]
        domain = None if req.softmax_over == "padded" else _end_index(tokens) + 1
    pipe = _need_pipe(req.pipe, "open-vocabulary maps")
    modules = _key_modules(pipe, record, req.layers)
    columns, local = _unique_columns(groups)
    per_layer = _softmax_maps(record, req, modules, states, columns, domain, bias=bias)
    return _pool(_to_latent(per_layer, record), local, req.pooling), groups


def _open_vocab_replayed(record: Record, req: _Request) -> tuple[Tensor, list[list[int]]]:
    """Open-vocabulary maps in joint attention: X''s own text stream replayed beside the generation's frozen image
    stream (:mod:`opendaam.replay`)."""
    from opendaam.replay import encode_prompt_states, replay_daam

    pipe = _need_pipe(req.pipe, "open-vocabulary maps")
    if any(it.embedding is not None for it in req.items):
        raise ValueError("open_vocab in joint attention (SD3, Flux) takes words; embeddings have no text stream to "
                         "replay")
    if req.softmax_over != "padded":
        raise ValueError("open_vocab in joint attention runs the softmax over all text columns, as the model does; "
                         "leave softmax_over at 'padded'")
    words = [it.word for it in req.items if it.word is not None]
    _key_modules(pipe, record, req.layers)  # the same model
    if isinstance(req.context, str):
        text = req.context
    elif record.tokens and all(_in_prompt(record.tokens, w) for w in words):
        text = None  # X = the prompt: its own states
    else:
        missing = [w for w in words if not _in_prompt(record.tokens or [], w)]
        text = f"{record.meta.get('prompt', '')}, {', '.join(missing)}"
    if text is None:
        states, segments = record.context, record.meta.get("segments", [])
    else:
        states = encode_prompt_states(pipe, text, record.context.shape[0])
        segments = prompt_segments(pipe, text)
    tokens = segments[0]["tokens"] if segments else _need_tokens(record)
    items = req.items or [_Item(label=t, indices=[i]) for i, t in enumerate(tokens)]
    req.items = items
    groups = [it.indices if it.indices is not None else segment_columns(tokens, segments, it.word) for it in items]
    columns, local = _unique_columns(groups)
    daam = replay_daam(record, pipe, states, req.layers, req.positions)
    per_layer = {}
    for name in req.layers:
        hs = select_heads(record.layers[name], req.heads)
        probs = daam[name] if hs is None else daam[name][hs]  # (heads, N, T)
        per_layer[name] = probs.sum(0)[:, columns].T  # (J, N)
    return _pool(_to_latent(per_layer, record), local, req.pooling), groups


def _replace_items(req: _Request, items: list[_Item]) -> _Request:
    """A copy of ``req`` asking for other items."""
    return _Request(items=items, pipe=req.pipe, context=req.context, layers=req.layers, positions=req.positions,
                    heads=req.heads, softmax_over=req.softmax_over, pooling=req.pooling)


def _context_states(record: Record, req: _Request) -> tuple[Tensor, list[str], Tensor | None]:
    """X' for open_vocab: the given context, else the generating prompt (plus any missing words); its states,
    tokens and padding bias."""
    if isinstance(req.context, Tensor):
        raise ValueError("pass embeddings as the query, not as context=")
    words = [it.word for it in req.items if it.word is not None]
    if req.context is None and record.tokens and record.context is not None:
        missing = [w for w in words if not _in_prompt(record.tokens, w)]
        if not missing:
            return record.context.float(), record.tokens, _record_bias(record)
        text = f"{record.meta.get('prompt', '')}, {', '.join(missing)}"
    elif req.context is None:
        raise ValueError("open_vocab needs a context prompt X': pass context='a car and a tree in ...'")
    else:
        text = req.context
    pipe = _need_pipe(req.pipe, "open-vocabulary maps of new text")
    length = record.context.shape[0] if record.context is not None else None  # pad as the record's prompt
    encoded, tokens = _encode(pipe, text, length)
    return encoded.states[0], tokens, None if encoded.bias is None else encoded.bias[0]


def _record_bias(record: Record) -> Tensor | None:
    """The score bias ``(T,)`` of the record's padded prompt columns (PixArt), as the model added it."""
    mask = record.meta.get("text_mask")
    return None if mask is None else (1 - torch.tensor(mask, dtype=torch.float32)) * -10000.0


def _in_prompt(tokens: list[str], word: str) -> bool:
    """Whether ``word`` occurs in the tokenized prompt."""
    try:
        find_tokens(tokens, word)
        return True
    except KeyError:
        return False


def _linear(record: Record, req: _Request) -> tuple[Tensor, list[list[int]]]:
    """Linear DAAM: the query-key products without softmax for one embedding x, ``M x`` (eq. 3.7-3.8)."""
    items = req.items
    if not items:
        raise ValueError("method='linear' needs words or embeddings to map")
    vectors, groups = [], []
    for it in items:
        if it.embedding is not None:
            vectors.append(it.embedding[it.use].float() if it.use is not None else it.embedding.float())
            groups.append([])
        else:
            emb, idx = _word_embedding(record, req, it)
            vectors.append(emb)
            groups.append(idx)
    sizes = [v.shape[0] for v in vectors]
    x = torch.cat(vectors)  # (J, text_dim)
    full = req.positions is None and req.heads is None and req.layers == list(record.layers)
    if full and record.linear_map is not None:
        flat = record.linear_map @ x.T  # (h*w, J)
        if record.linear_bias is not None:
            flat = flat + record.linear_bias[:, None]
        h, w = record.latent_size
        latent = flat.T.reshape(-1, h, w)  # (J, h, w)
    else:
        latent = _to_latent(_linear_layers(record, req, x), record)
    splits = torch.split(latent, sizes)
    pooled = torch.stack([s.mean(0) if req.pooling == "mean" else s.sum(0) for s in splits])
    return pooled, groups


def _linear_layers(record: Record, req: _Request, x: Tensor) -> dict[str, Tensor]:
    """Per layer ``(J, N)`` linear maps for a subset of layers, steps or heads."""
    pipe = _need_pipe(req.pipe, "linear maps of chosen layers, steps or heads")
    modules = _key_modules(pipe, record, req.layers)
    out = {}
    for name in req.layers:
        info = record.layers[name]
        if not info.key_linear:
            raise ValueError(f"layer {name} normalizes its keys: no linear map exists")
        if req.positions is None and name in record.query_sums:
            qsum = record.query_sums[name].float().view(info.pixels, info.heads, info.head_dim)
        elif record.queries:
            qsum = queries(record, name, req.positions).sum(0).transpose(0, 1)  # (N, heads, head_dim)
        else:
            raise ValueError(
                "linear maps of chosen layers/steps/heads need the per-layer sums (linear_layers=True) or "
                "the query cache (queries=True) when tracing; the matrix M alone covers all of them"
            )
        weight, bias = key_weight(modules[name])
        k = F.linear(x, weight, bias).view(x.shape[0], info.heads, info.head_dim)  # (J, heads, head_dim)
        hs = select_heads(info, req.heads)
        if hs is not None:
            qsum, k = qsum[:, hs], k[:, hs]
        out[name] = torch.einsum("nhd,jhd->jn", qsum, k)  # (J, N)
    return out


def _word_embedding(record: Record, req: _Request, item: _Item) -> tuple[Tensor, list[int]]:
    """Embedding rows for a word: from the generating prompt when it is there, else the word encoded alone."""
    if item.indices is not None:
        if record.context is None:
            raise ValueError("token indices need the record's context embeddings")
        return record.context[item.indices].float(), item.indices
    if req.context is None and record.tokens and record.context is not None and _in_prompt(record.tokens,
                                                                                             item.word):
        idx = find_tokens(record.tokens, item.word)
        return record.context[idx].float(), idx
    pipe = _need_pipe(req.pipe, f"the linear map of {item.word!r} (not in the generating prompt)")
    text = req.context if isinstance(req.context, str) else item.word
    states, tokens = encode_text(pipe, text, record.context.shape[0] if record.context is not None else None)
    idx = find_tokens(tokens, item.word)
    return states[idx], idx


@dataclass(frozen=True)
class Method:
    """A heatmap method: maps (record, request) to ``(labels, h, w)`` latent maps and each label's tokens.

    Attributes:
        name: the name :func:`heatmaps` takes.
        compute: the function of (record, request).
        normalization: how its maps are scaled to [0, 1] for masks and curves (``"max"``, DAAM's eq. 3.4, or
            ``"minmax"`` for maps that can be negative).
        description: one line for help texts.
    """

    name: str
    compute: Callable[[Record, _Request], tuple[Tensor, list[list[int]]]]
    normalization: str
    description: str

    def __call__(self, record: Record, request: _Request) -> tuple[Tensor, list[list[int]]]:
        return self.compute(record, request)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("daam", _daam, "max", "softmax cross-attention of the generating prompt's tokens"),
    Method("open_vocab", lambda record, request: (_open_vocab_replayed if record.replay else _open_vocab)(
        record, request), "max", "softmax attention of the cached queries (joint attention: the replayed steps) "
        "over any text's keys"),
    Method("linear", _linear, "minmax", "query-key products without softmax for one embedding: M x"),
)}
"""Heatmap methods by name: the one registry every module and command takes methods from."""


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: an unknown name; the message lists the valid ones.

    Examples:
        >>> get_method("linear").normalization
        'minmax'
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def heatmaps(
    record: Record,
    query=None,
    method: str = "daam",
    *,
    pipe=None,
    context: str | None = None,
    layers: str | Sequence[str] | None = None,
    steps: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    softmax_over: str = "padded",
    pooling: str = "mean",
) -> Heatmaps:
    """Word-to-pixel maps from a traced record.

    Args:
        record: a :class:`~opendaam.tracing.Record` from ``tracer.records`` or :func:`opendaam.load_record`.
        query: a word or phrase (``"traffic light"``: its tokens are pooled), ``"<sot>"``/``"<eot>"``, a
            token index, a ``(text_dim,)`` or ``(k, text_dim)`` embedding tensor, an optimized token, or a
            list of those. None maps every token of the prompt (``daam``, ``open_vocab``).
        method: one of :data:`METHODS`: ``"daam"``, ``"open_vocab"`` or ``"linear"``.
        pipe: the pipeline that generated the record; needed to encode new text and for key projections
            (open_vocab, per-layer linear maps). DAAM and full linear maps of prompt words do not need it.
        context: open_vocab's prompt X'. Default: the generating prompt, with the missing words appended
            after a comma. For linear, words are encoded alone unless they are in the generating prompt
            (then its contextual embedding is used, as in the thesis) or a context is given.
        layers: layer names or prefixes (``"up_blocks.1"``, ``"mid_block"``) to sum over; all by default.
        steps: U-Net call indices to sum over; all by default (needs per-step data or the query cache).
        heads: head indices to sum over in every chosen layer; all by default.
        softmax_over: open_vocab's softmax domain: ``"padded"`` runs over all 77 positions of X' (as the
            model attends, so X' = X equals DAAM), ``"prompt"`` only over its tokens from start to end.
        pooling: ``"mean"`` or ``"sum"`` of the token maps of a multi-token word.

    Returns:
        :class:`Heatmaps` whose ``.soft`` is ``(labels, H, W)`` at image size.

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> from opendaam.tracing import trace
        >>> pipe = build_pipeline("tiny")
        >>> with trace(pipe, prompt="a red car", queries=True) as tracer:
        ...     _ = pipe("a red car", num_inference_steps=2, height=32, width=32, output_type="np")
        >>> record = tracer.records[0]
        >>> heatmaps(record, ["car", "red car"]).soft.shape
        torch.Size([2, 32, 32])
        >>> heatmaps(record, "tree", method="linear", pipe=pipe).labels
        ['tree']
    """
    chosen = get_method(method)
    if softmax_over not in ("padded", "prompt"):
        raise ValueError(f"softmax_over must be 'padded' or 'prompt', not {softmax_over!r}")
    if pooling not in ("mean", "sum"):
        raise ValueError(f"pooling must be 'mean' or 'sum', not {pooling!r}")
    req = _Request(
        items=_parse(query), pipe=pipe, context=context, layers=select_layers(record, layers),
        positions=select_steps(record, steps), heads=heads, softmax_over=softmax_over, pooling=pooling,
    )
    latent, groups = chosen(record, req)
    labels = [it.label for it in req.items] if req.items else [t for t in (record.tokens or [])]
    if len(labels) != latent.shape[0]:
        labels = [f"token[{i}]" for i in range(latent.shape[0])]
    mode = record.meta.get("trace_config", {}).get("upsample", "bicubic")
    return Heatmaps(latent=latent, labels=labels, token_indices=groups, method=method,
                    image_size=record.image_size, mode=mode)
