"""The record: what a trace keeps of one generated image, and its safe file format.

A :class:`Record` is a plain cache of tensors and JSON provenance. Recorders fill it while the pipeline runs
(:mod:`opendaam.tracing.recorders`); maps are computed from it afterwards (:mod:`opendaam.heatmaps`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from opendaam._io import atomic_write_with

__all__ = ["FORMAT_VERSION", "LayerInfo", "Record", "store_queries"]

FORMAT_VERSION = 1
"""Version of the record file layout written by :meth:`Record.save`."""


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
        self_attention: layer -> ``(N, N)`` image self-attention affinities, the mean over heads summed over the
            recorded steps (rows: query pixels), for label refinement; grids in ``meta["self_attention_grids"]``.
        replay: joint attention (SD3, Flux): what the denoiser was called with at the recorded steps, for
            open-vocabulary maps of new text: ``hidden_states`` ``(steps, ...)`` and ``timestep`` ``(steps,)``
            of the conditional row, and the call's constant inputs (pooled embeddings, guidance, position ids).
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
    replay: dict[str, Tensor] = field(default_factory=dict)
    self_attention: dict[str, Tensor] = field(default_factory=dict)

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

        Examples:
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

        Examples:
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
        """Read a record written by :meth:`save` (safetensors only, no pickle), checked against its metadata.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: ``not an opendaam record: ...`` for a file that is not one (truncated, pickle, another
                safetensors file), or a record whose tensors disagree with its metadata (edited sizes).
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no record at {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if "opendaam" not in metadata:
                    raise ValueError(f"not an opendaam record: {path} is a safetensors file without opendaam's "
                                     "header")
                header = json.loads(metadata["opendaam"])
                if header.get("format") != FORMAT_VERSION:
                    raise ValueError(f"{path} has record format {header.get('format')}, this opendaam reads "
                                     f"{FORMAT_VERSION}")
                record = cls(meta=header["meta"], layers={d["name"]: LayerInfo(**d) for d in header["layers"]})
                for key in handle.keys():
                    name, _, layer = key.partition("/")
                    if name not in _FIELDS:
                        raise ValueError(f"not an opendaam record: {path} holds an unknown tensor {key!r}")
                    tensor = handle.get_tensor(key).clone()  # own, aligned memory: results match the live record
                    if layer:
                        getattr(record, name)[layer] = tensor
                    else:
                        setattr(record, name, tensor)
        except SafetensorError as error:
            raise ValueError(f"not an opendaam record: {path} is not a readable safetensors file ({error})") from None
        except (json.JSONDecodeError, TypeError, KeyError, AttributeError) as error:
            raise ValueError(f"not an opendaam record: {path} has a malformed header ({error!r})") from None
        problem = record.inconsistency()
        if problem:
            raise ValueError(f"{path}: the record's tensors disagree with its metadata: {problem}")
        return record

    def inconsistency(self) -> str | None:
        """What in the record contradicts its metadata (sizes, layer geometry), or None.

        Examples:
            >>> Record(meta={"latent_size": [2, 2]}, linear_map=torch.zeros(5, 3)).inconsistency()
            'linear_map has 5 rows but the latent is 2x2 (4 pixels)'
        """
        meta = self.meta
        latent = meta.get("latent_size")
        if latent is not None:
            if len(latent) != 2 or min(latent) < 1:
                return f"latent_size {latent} is not two positive sizes"
            image = meta.get("image_size")
            factor = meta.get("vae_scale_factor")
            if image is not None and factor is not None and list(image) != [latent[0] * factor, latent[1] * factor]:
                return f"image_size {image} is not the latent size {latent} times the VAE's factor {factor}"
            if image is not None and (len(image) != 2 or image[0] % latent[0] or image[1] % latent[1]
                                      or image[0] // latent[0] != image[1] // latent[1]):
                return f"image_size {image} is not the latent size {latent} times one factor"
            pixels = latent[0] * latent[1]
            if self.linear_map is not None and self.linear_map.shape[0] != pixels:
                return (f"linear_map has {self.linear_map.shape[0]} rows but the latent is {latent[0]}x{latent[1]} "
                        f"({pixels} pixels)")
        text_dim = meta.get("text_dim")
        if text_dim is not None:
            if self.context is not None and self.context.shape[-1] != text_dim:
                return f"context is {self.context.shape[-1]} wide but text_dim is {text_dim}"
            if self.linear_map is not None and self.linear_map.shape[-1] != text_dim:
                return f"linear_map is {self.linear_map.shape[-1]} wide but text_dim is {text_dim}"
        tokens = self.context.shape[0] if self.context is not None else None
        grids = meta.get("self_attention_grids", {})
        for name, affinity in self.self_attention.items():
            grid = grids.get(name)
            if grid is None or tuple(affinity.shape) != (grid[0] * grid[1],) * 2:
                return f"self_attention[{name}] is {tuple(affinity.shape)}, its grid is {grid}"
        replayed = self.replay.get("hidden_states")
        if replayed is not None and replayed.shape[0] != len(self.steps):
            return f"replay holds {replayed.shape[0]} steps but the record names {len(self.steps)}"
        for kind in ("daam", "daam_steps", "queries", "query_scales", "query_sums"):
            for name, tensor in getattr(self, kind).items():
                info = self.layers.get(name)
                if info is None:
                    return f"{kind} has layer {name!r}, which the record's layer list lacks"
                want = {
                    "daam": (info.heads, info.pixels, tokens),
                    "daam_steps": (None, info.heads, info.pixels, tokens),
                    "queries": (None, info.heads, info.pixels, info.head_dim),
                    "query_scales": (None, info.heads, info.pixels),
                    "query_sums": (info.pixels, info.heads * info.head_dim),
                }[kind]
                got = tuple(tensor.shape)
                if len(got) != len(want) or any(w is not None and g != w for g, w in zip(got, want, strict=True)):
                    shape = tuple("*" if w is None else w for w in want)
                    return f"{kind}[{name}] is {got}, its layer's geometry says {shape}"
        return None


_FIELDS = {f.name for f in fields(Record)} - {"meta", "layers"}


def _tensor_fields(record: Record):
    """(name, value) of the record's non-empty tensor fields."""
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, Tensor) or (isinstance(value, dict) and value and f.name != "meta"
                                         and f.name != "layers"):
            yield f.name, value


def store_queries(q: Tensor, dtype: str) -> tuple[Tensor, Tensor | None]:
    """Queries ``(heads, N, head_dim)`` in the cache's storage dtype, contiguous (heads first, so maps are
    computed without reshuffling); int8 keeps one absmax scale per head and pixel.

    Examples:
        >>> codes, scales = store_queries(torch.tensor([[[0.5, -1.0]]]), "int8")
        >>> codes.tolist(), round(float(scales[0, 0]) * 127, 2)
        ([[[64, -127]]], 1.0)
    """
    if dtype != "int8":
        return q.to(getattr(torch, dtype), memory_format=torch.contiguous_format), None
    scale = q.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127.0  # (heads, N, 1)
    codes = torch.round(q.float() / scale).clamp_(-127, 127).to(torch.int8).contiguous()
    return codes, scale.squeeze(-1).to(torch.float16)  # (heads, N, head_dim) int8, (heads, N) fp16
