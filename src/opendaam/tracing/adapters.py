"""Architecture adapters: where a denoiser's text-conditioned attention layers are, and what they compute.

One small class per attention family finds the layers (by module type and configuration, never by a name such
as ``attn2``: SD3.5's ``attn2`` is image-only self-attention) and gives each a :class:`LayerKind` that says how to
get, from one call of the layer, the image queries, the text keys and any score bias exactly as the layer's
processor computes them (norms, RoPE and padding masks included). The tracer, heatmaps and optimization ask
:func:`adapter_for` and never look inside a denoiser themselves.

Families (facts: ``docs/dev/families.md``):

* U-Net cross-attention (Stable Diffusion 1/2, SDXL): keys from the text states passed to the layer;
* DiT cross-attention (PixArt-alpha/Sigma): the same, with the T5 padding mask as a score bias;
* joint attention ``[image; text]`` (SD3/SD3.5): text keys ``norm_added_k(add_k_proj(c))`` of the block's text
  stream; SD3.5's image-only attention is left out;
* joint attention ``[text; image]`` (Flux): double-stream blocks as SD3 plus RoPE; single-stream blocks attend over
  one sequence ``[text; image]`` whose text length comes from the transformer's call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from opendaam.attention import key_linear, query_heads, text_keys
from opendaam.models import DENOISERS, cross_attention_layers

__all__ = [
    "ADAPTERS",
    "Adapter",
    "CrossAttention",
    "EncodedText",
    "FluxAdapter",
    "JointAttention",
    "LayerCall",
    "LayerKind",
    "PixArtAdapter",
    "SD3Adapter",
    "UNetCrossAttention",
    "adapter_for",
    "clip_encoders",
    "encode_clip_ids",
    "flow_order",
    "layer_presets",
]


@dataclass
class LayerCall:
    """One call of a text-conditioned attention layer, as its processor received it."""

    hidden_states: Tensor  # (B, N, dim) or (B, C, h, w); Flux single-stream: (B, T + N, dim)
    encoder_hidden_states: Tensor | None = None  # (B, T, D) text states, None in single-stream blocks
    attention_mask: Tensor | None = None  # PixArt: (B, 1, T) additive score bias
    temb: Tensor | None = None  # U-Net spatial norm input
    rotary: tuple[Tensor, Tensor] | None = None  # Flux: (cos, sin), each (T + N, head_dim)
    text_len: int = 0  # text tokens of the denoiser's call


@dataclass
class EncodedText:
    """New text encoded the way the pipeline encodes its prompt, as the attention layers read it."""

    states: Tensor  # (B, T, D) float32 text states the layers' keys are computed from
    bias: Tensor | None = None  # (B, T) score bias of padding tokens (PixArt), natural-log units


class LayerKind:
    """How one kind of layer computes its image queries and text keys (cross-attention by default)."""

    joint = False  # the model's softmax runs over image and text keys together (MM-DiT)
    linear = True  # keys may be linear in the text states (then :meth:`key_linear` decides per layer)

    def query_input(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        """The layer's query input ``(n, N, dim)`` for the conditional ``rows`` (norms included)."""
        h = call.hidden_states[rows]
        if attn.spatial_norm is not None:
            h = attn.spatial_norm(h, call.temb[rows] if call.temb is not None else None)
        if h.ndim == 4:
            b, c, hh, ww = h.shape
            h = h.view(b, c, hh * ww).transpose(1, 2)  # (n, N, dim)
        if attn.group_norm is not None:
            h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
        return h

    def projections(self, attn: nn.Module) -> list[nn.Module | None]:
        """The layer's query projection and, where keys change every step (joint attention), its text key
        projection: the tracer reads their outputs from the model's own call instead of computing them again."""
        return [attn.to_q, None]

    def query_rows(self, projected: Tensor, call: LayerCall, rows: slice) -> Tensor:
        """The image queries' projection ``(n, N, inner)`` of the conditional ``rows`` from ``to_q``'s output."""
        return projected[rows]

    def head_queries(self, attn: nn.Module, flat: Tensor, call: LayerCall) -> Tensor:
        """Per-head queries ``(..., heads, N, head_dim)`` from the projection ``flat`` ``(..., N, inner)``."""
        return query_heads(attn, flat)

    def text_states(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor | None:
        """The text states ``(n, T, D)`` the layer's keys are computed from, for ``rows``."""
        states = call.encoder_hidden_states
        return None if states is None else states[rows]

    def keys(self, attn: nn.Module, states: Tensor, call: LayerCall | None = None,
             exact_module: bool = False) -> Tensor:
        """Keys ``(..., heads, T, head_dim)`` of text ``states`` ``(..., T, D)``, without the softmax scale."""
        return text_keys(attn, states, exact_module=exact_module)

    def score_bias(self, call: LayerCall, rows: slice) -> Tensor | None:
        """An additive bias ``(n, T)`` on the scores (natural-log units), or None."""
        return None

    def image_keys(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        """Joint attention: the keys ``(n, heads, N, head_dim)`` of the image tokens the text competes with."""
        raise ValueError("only joint attention (SD3, Flux) has image keys in the text softmax")

    def scale(self, attn: nn.Module) -> float:
        """The softmax temperature."""
        return float(attn.scale)

    def key_linear(self, attn: nn.Module) -> bool:
        """Whether keys are a linear function of the layer's text states."""
        return self.linear and key_linear(attn)


class CrossAttention(LayerKind):
    """Cross-attention whose processor may add a padding mask to the scores (PixArt's T5 context)."""

    def score_bias(self, call: LayerCall, rows: slice) -> Tensor | None:
        mask = call.attention_mask
        if mask is None:
            return None
        mask = mask[rows]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, -math.inf)
        return mask.reshape(mask.shape[0], -1).float()  # (n, T): (B, 1, T) biases as the processor adds them


class JointAttention(LayerKind):
    """Joint attention ``[image; text]`` (SD3/SD3.5) or ``[text; image]`` (Flux double-stream): image queries
    ``norm_q(to_q(h))`` and text keys ``norm_added_k(add_k_proj(c))``, RoPE where the call carries it."""

    joint = True
    linear = False  # later blocks' text states depend on the image: no single linear map in the prompt's states

    def query_input(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        return call.hidden_states[rows]

    def projections(self, attn: nn.Module) -> list[nn.Module | None]:
        return [attn.to_q, self.key_projection(attn)]

    def key_projection(self, attn: nn.Module) -> nn.Module:
        """The module that projects the text states to keys."""
        return attn.add_k_proj

    def head_queries(self, attn: nn.Module, flat: Tensor, call: LayerCall) -> Tensor:
        q = super().head_queries(attn, flat, call)
        if call.rotary is not None:
            cos, sin = call.rotary
            q = _rope(q, cos[call.text_len :], sin[call.text_len :])
        return q

    def key_rows(self, projected: Tensor, call: LayerCall, rows: slice) -> Tensor:
        """The text keys' projection ``(n, T, inner)`` of the conditional ``rows`` from its module's output."""
        return projected[rows]

    def key_norm(self, attn: nn.Module):
        """The norm the processor applies to the text keys per head."""
        return attn.norm_added_k

    def projected_keys(self, attn: nn.Module, projected: Tensor, call: LayerCall | None) -> Tensor:
        """Keys ``(..., heads, T, head_dim)`` from the text key projection's output ``(..., T, inner)``: the split
        into heads, the key norm, RoPE on the text rows."""
        k = projected.view(*projected.shape[:-1], attn.heads, -1).transpose(-2, -3)
        norm = self.key_norm(attn)
        if norm is not None:
            k = norm(k)
        if call is not None and call.rotary is not None:
            cos, sin = call.rotary
            k = _rope(k, cos[: k.shape[-2]], sin[: k.shape[-2]])
        return k

    def keys(self, attn: nn.Module, states: Tensor, call: LayerCall | None = None,
             exact_module: bool = False) -> Tensor:
        projection = self.key_projection(attn)
        k = self.projected_keys(attn, projection(states.to(projection.weight.dtype)), call)  # (..., heads, T, d)
        return k if exact_module else k.float()

    def scale(self, attn: nn.Module) -> float:
        return 1.0 / math.sqrt(attn.to_q.out_features // attn.heads)  # scaled_dot_product_attention's default

    def image_keys(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        h = self.query_input(attn, call, rows)  # (n, N, dim)
        k = attn.to_k(h)
        k = k.view(*k.shape[:-1], attn.heads, -1).transpose(-2, -3)  # (n, heads, N, head_dim)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if call.rotary is not None:
            cos, sin = call.rotary
            k = _rope(k, cos[call.text_len :], sin[call.text_len :])
        return k


class SingleStream(JointAttention):
    """Flux single-stream attention: one sequence ``[text; image]`` through ``to_q``/``to_k`` with RoPE; the text
    rows are the first ``text_len`` of the call."""

    def query_input(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        return call.hidden_states[rows, call.text_len :]

    def text_states(self, attn: nn.Module, call: LayerCall, rows: slice) -> Tensor:
        return call.hidden_states[rows, : call.text_len]

    def key_projection(self, attn: nn.Module) -> nn.Module:
        return attn.to_k  # one sequence [text; image] through to_q and to_k

    def query_rows(self, projected: Tensor, call: LayerCall, rows: slice) -> Tensor:
        return projected[rows, call.text_len :]

    def key_rows(self, projected: Tensor, call: LayerCall, rows: slice) -> Tensor:
        return projected[rows, : call.text_len]

    def key_norm(self, attn: nn.Module):
        return attn.norm_k


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Flux's rotary embedding of ``(..., S, head_dim)`` rows with ``(S, head_dim)`` cos and sin (consecutive
    pairs rotated, in float32, cast back), as ``diffusers.models.embeddings.apply_rotary_emb`` applies it."""
    from diffusers.models.embeddings import apply_rotary_emb

    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])  # (B', 1, S, head_dim): its layout [B, H, S, D] with sequence_dim=2
    return apply_rotary_emb(flat, (cos, sin), sequence_dim=2).reshape(*lead, *x.shape[-2:])


class Adapter:
    """An attention family: where its layers are and how each is computed."""

    family: str = ""
    """Human-readable name of the family, used in error messages."""
    linear_keys = True
    """Keys are linear in one text context shared by all layers (linear maps and their optimization exist)."""
    branch_calls = False
    """The pipeline may call the denoiser once per guidance branch, conditional first (Flux's true CFG)."""

    @classmethod
    def matches(cls, pipe) -> bool:
        """Whether ``pipe``'s denoiser belongs to this family."""
        raise NotImplementedError

    @staticmethod
    def text_segments(pipe) -> tuple[str, ...]:
        """The tokenizers whose token columns make the denoiser's text input, in column order."""
        return ("tokenizer",)

    @staticmethod
    def denoiser(pipe) -> nn.Module:
        """The module the pipeline calls once per step (per branch) with the noisy latent."""
        return pipe.transformer

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        """The text-conditioned attention modules, keyed by their ``attn_processors`` name, in model order."""
        raise NotImplementedError

    @staticmethod
    def kind(name: str, module: nn.Module) -> LayerKind:
        """How the layer ``name`` computes its queries and keys."""
        return _CROSS

    @classmethod
    def self_layers(cls, denoiser: nn.Module) -> dict[str, nn.Module]:
        """The image self-attention modules (pixel-to-pixel affinities for label refinement), by processor key."""
        raise ValueError(f"self-attention refinement reads image-only attention layers; {cls.family} has its "
                         "image tokens attend together with the text (not available yet)")

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        """Width of the text states the layers' keys are computed from."""
        raise NotImplementedError

    @classmethod
    def encode(cls, pipe, texts: list[str], length: int | None = None) -> EncodedText:
        """Texts encoded as the pipeline encodes a prompt, up to the states the attention layers read (padded
        to ``length`` tokens, or as the pipeline pads)."""
        raise ValueError(
            f"open-vocabulary and linear maps of new text are not available for {cls.family}: a word's keys in "
            "later blocks depend on the image through the text stream; use method='daam' for the prompt's words")

    @staticmethod
    def sample(args: tuple, kwargs: dict) -> tuple[Tensor, object]:
        """The noisy latent and the timestep from the denoiser's call arguments (diffusers' transformer pipelines
        pass everything but the latent by keyword)."""
        sample = args[0] if args else kwargs.get("hidden_states")
        return sample, kwargs.get("timestep")

    @staticmethod
    def text_input(args: tuple, kwargs: dict) -> Tensor | None:
        """The text states ``(B, T, D)`` the denoiser was called with."""
        return kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)

    @staticmethod
    def latent_size(sample: Tensor, kwargs: dict) -> tuple[int, int]:
        """``(h, w)`` of the VAE latent being denoised."""
        return int(sample.shape[-2]), int(sample.shape[-1])


_CROSS = CrossAttention()
_JOINT = JointAttention()
_SINGLE = SingleStream()


class UNetCrossAttention(Adapter):
    """U-Net cross-attention (Stable Diffusion 1 and 2, SDXL): ``Attention`` modules with
    ``is_cross_attention``; queries from the image, keys from the text states passed as
    ``encoder_hidden_states``."""

    family = DENOISERS["UNet2DConditionModel"]

    @classmethod
    def matches(cls, pipe) -> bool:
        return isinstance(getattr(pipe, "unet", None), nn.Module)

    @staticmethod
    def denoiser(pipe) -> nn.Module:
        return pipe.unet

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        return cross_attention_layers(denoiser)

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        return int(denoiser.config.cross_attention_dim)

    @classmethod
    def self_layers(cls, denoiser: nn.Module) -> dict[str, nn.Module]:
        return _named(denoiser, lambda name, m: type(m).__name__ == "Attention"
                      and not getattr(m, "is_cross_attention", True))

    @staticmethod
    def sample(args: tuple, kwargs: dict) -> tuple[Tensor, object]:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return sample, timestep

    @staticmethod
    def text_input(args: tuple, kwargs: dict) -> Tensor | None:
        return args[2] if len(args) > 2 else kwargs.get("encoder_hidden_states")

    @classmethod
    def encode(cls, pipe, texts: list[str], length: int | None = None) -> EncodedText:
        ids = [tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids for tokenizer, _ in clip_encoders(pipe)]
        return EncodedText(encode_clip_ids(pipe, ids))


def clip_encoders(pipe) -> list[tuple[object, nn.Module]]:
    """The (tokenizer, text encoder) pairs whose states make a U-Net's text context, in context order: one for
    Stable Diffusion 1/2, two for SDXL (their penultimate states side by side)."""
    pairs = [(getattr(pipe, t, None), getattr(pipe, e, None))
             for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))]
    pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
    if not pairs:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer and text encoder to encode new words with")
    return pairs


def encode_clip_ids(pipe, ids: list[Tensor]) -> Tensor:
    """A U-Net's text context ``(batch, T, text_dim)`` for token ids ``(batch, T)`` of each of
    :func:`clip_encoders`, built as the pipeline builds it: the last state of a single encoder (Stable Diffusion
    1/2), or the penultimate states of both encoders side by side (SDXL). The encoders run without gradients and
    out of any trace's view."""
    from opendaam.tracing.hooks import quiet_text_hooks

    pairs = clip_encoders(pipe)
    parts = []
    with torch.no_grad(), quiet_text_hooks():  # opendaam's own encoding is no generation's prompt
        for (_, encoder), tokens in zip(pairs, ids, strict=True):
            if len(pairs) == 1:
                parts.append(encoder(tokens.to(encoder.device))[0])  # (batch, T, width)
            else:
                out = encoder(tokens.to(encoder.device), output_hidden_states=True)
                parts.append(out.hidden_states[-2])  # (batch, T, width_i)
    return torch.cat(parts, dim=-1).float().cpu()  # (batch, T, text_dim)


def _named(denoiser: nn.Module, wanted) -> dict[str, nn.Module]:
    """``{processor key: module}`` of the attention modules for which ``wanted(module_name, module)`` holds."""
    processors = getattr(denoiser, "attn_processors", None) or {}
    return {f"{name}.processor": module for name, module in denoiser.named_modules()
            if f"{name}.processor" in processors and wanted(name, module)}


class PixArtAdapter(Adapter):
    """DiT cross-attention (PixArt-alpha/Sigma): the blocks' cross-attention over the projected T5 context, with
    the padding mask as a score bias."""

    family = DENOISERS["PixArtTransformer2DModel"]

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "PixArtTransformer2DModel"

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        found = _named(denoiser, lambda name, m: getattr(m, "is_cross_attention", False))
        if not found:
            raise ValueError(f"{type(denoiser).__name__} has no cross-attention layer to read")
        return found

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        # keys read the caption projection's output, the blocks' width
        return int(denoiser.config.num_attention_heads * denoiser.config.attention_head_dim)

    @classmethod
    def self_layers(cls, denoiser: nn.Module) -> dict[str, nn.Module]:
        return UNetCrossAttention.self_layers(denoiser)

    @classmethod
    def encode(cls, pipe, texts: list[str], length: int | None = None) -> EncodedText:
        import inspect

        from opendaam.tracing.hooks import quiet_text_hooks

        if length is None:  # the pipeline's own padding: 120 tokens for PixArt-alpha, 300 for Sigma
            length = inspect.signature(pipe.__call__).parameters["max_sequence_length"].default
        tokens = pipe.tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                                add_special_tokens=True, return_tensors="pt")
        encoder, transformer = pipe.text_encoder, pipe.transformer
        with torch.no_grad(), quiet_text_hooks():
            states = encoder(tokens.input_ids.to(encoder.device),
                             attention_mask=tokens.attention_mask.to(encoder.device))[0]  # (B, T, 4096)
            if transformer.caption_projection is not None:  # the transformer projects the T5 states itself
                states = transformer.caption_projection(states.to(transformer.dtype))  # (B, T, inner)
        bias = (1 - tokens.attention_mask.float()) * -10000.0  # as PixArtTransformer2DModel turns the mask
        return EncodedText(states.float().cpu(), bias)


class SD3Adapter(Adapter):
    """Joint attention ``[image; text]`` (SD3, SD3.5): every ``Attention`` with added key projections; SD3.5's
    image-only attention (no ``add_k_proj``) is not text-conditioned and is left out."""

    family = DENOISERS["SD3Transformer2DModel"]
    linear_keys = False

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        return _named(denoiser, lambda name, m: getattr(m, "add_k_proj", None) is not None)

    @staticmethod
    def kind(name: str, module: nn.Module) -> LayerKind:
        return _JOINT

    @staticmethod
    def text_segments(pipe) -> tuple[str, ...]:
        # CLIP columns (both CLIP encoders side by side, one set of tokens), then T5's
        return ("tokenizer", "tokenizer_3") if getattr(pipe, "tokenizer_3", None) is not None else ("tokenizer",)

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        return int(denoiser.config.joint_attention_dim)


class FluxAdapter(Adapter):
    """Joint attention ``[text; image]`` (Flux): double-stream blocks (added key projections) and single-stream
    blocks (one sequence whose first ``T`` rows are text), all with RoPE."""

    family = DENOISERS["FluxTransformer2DModel"]
    linear_keys = False
    branch_calls = True

    @classmethod
    def matches(cls, pipe) -> bool:
        return type(getattr(pipe, "transformer", None)).__name__ == "FluxTransformer2DModel"

    @staticmethod
    def layers(denoiser: nn.Module) -> dict[str, nn.Module]:
        singles = {f"{n}.attn" for n, m in denoiser.named_modules() if type(m).__name__ == "FluxSingleTransformerBlock"}
        return _named(denoiser, lambda name, m: getattr(m, "add_k_proj", None) is not None or name in singles)

    @staticmethod
    def kind(name: str, module: nn.Module) -> LayerKind:
        return _JOINT if getattr(module, "add_k_proj", None) is not None else _SINGLE

    @staticmethod
    def text_segments(pipe) -> tuple[str, ...]:
        return ("tokenizer_2",)  # T5; CLIP gives only the pooled vector

    @staticmethod
    def text_dim(denoiser: nn.Module) -> int:
        return int(denoiser.config.joint_attention_dim)

    @staticmethod
    def latent_size(sample: Tensor, kwargs: dict) -> tuple[int, int]:
        ids = kwargs.get("img_ids")  # (N, 3) positions (0, row, col) of the packed 2x2 latent patches
        if ids is None:
            raise ValueError("the Flux transformer was called without img_ids: cannot place its image tokens")
        ids = ids.reshape(-1, ids.shape[-1])
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return 2 * rows, 2 * cols


def flow_order(name: str) -> tuple[int, ...]:
    """A sort key that puts layer (or block) names in the order data flows through the denoiser: a U-Net's
    down blocks, mid block, up blocks (diffusers registers ``mid_block`` last); a transformer's double-stream
    blocks before its single-stream ones; block numbers numerically.

    Examples:
        >>> sorted(["up_blocks.0.a", "mid_block.a", "down_blocks.10.a", "down_blocks.2.a"], key=flow_order)
        ['down_blocks.2.a', 'down_blocks.10.a', 'mid_block.a', 'up_blocks.0.a']
    """
    stage = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2, "transformer_blocks": 0,
             "single_transformer_blocks": 1}.get(name.split(".")[0], 3)
    return (stage, *(int(part) for part in name.split(".") if part.isdigit()))


def layer_presets(names: list[str]) -> dict[str, list[str]]:
    """Named layer selections of a model's text-conditioned layers (``names`` in model order).

    * ``"early"``, ``"middle"``, ``"late"``: the first, second and last third of the layers in the order data
      flows through them (:func:`flow_order`);
    * Flux: ``"double"`` and ``"single"``, the double- and single-stream blocks, and ``"conceptattention"``, the
      second half of the double-stream blocks (ConceptAttention reads double-stream blocks from a start index to
      the last one).

    Examples:
        >>> names = [f"transformer_blocks.{i}.attn.processor" for i in range(4)]
        >>> names += [f"single_transformer_blocks.{i}.attn.processor" for i in range(2)]
        >>> presets = layer_presets(names)
        >>> presets["conceptattention"]
        ['transformer_blocks.2.attn.processor', 'transformer_blocks.3.attn.processor']
        >>> [name.split(".")[0] for name in presets["late"]]
        ['single_transformer_blocks', 'single_transformer_blocks']
    """
    flow = sorted(names, key=flow_order)
    n = len(flow)
    presets = {"early": flow[: n // 3], "middle": flow[n // 3 : n - n // 3], "late": flow[n - n // 3 :]}
    single = [x for x in names if x.startswith("single_transformer_blocks.")]
    if single:
        double = [x for x in names if x not in single]
        presets.update(double=double, single=single, conceptattention=double[len(double) // 2 :])
    return {k: v for k, v in presets.items() if v}


ADAPTERS: tuple[type[Adapter], ...] = (UNetCrossAttention, PixArtAdapter, SD3Adapter, FluxAdapter)
"""The supported attention families, tried in order."""


def adapter_for(pipe) -> type[Adapter]:
    """The adapter of ``pipe``'s denoiser.

    Raises:
        ValueError: the pipeline belongs to no supported family; the message names them.

    Examples:
        >>> from opendaam.models import build_pipeline
        >>> adapter_for(build_pipeline("tiny")).family
        'U-Net cross-attention (Stable Diffusion 1/2, SDXL)'
    """
    for adapter in ADAPTERS:
        if adapter.matches(pipe):
            return adapter
    has = [n for n in ("unet", "transformer") if getattr(pipe, n, None) is not None]
    found = f"its denoiser is {type(getattr(pipe, has[0])).__name__}" if has else "it has no unet or transformer"
    raise ValueError(
        f"opendaam cannot trace {type(pipe).__name__}: {found}. Supported families: "
        + "; ".join(a.family for a in ADAPTERS)
    )
