"""Checks the commands run before any expensive work: optional packages, option ranges, output folders,
model folders, prompts, record and token files. Each failure is one line naming the problem and the fix.

Nothing here loads a model: model folders are checked from their config files, prompts with the model's
tokenizer files.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from opendaam.dataset.spec import MAX_SEED

__all__ = [
    "EXTRAS",
    "MAX_SEED",
    "MissingExtra",
    "ModelInfo",
    "check_model",
    "check_output_dir",
    "check_output_file",
    "check_prompt",
    "check_record_file",
    "check_size",
    "check_token_file",
    "in_range",
    "missing_extras",
    "require",
]

EXTRAS = {
    "matplotlib": ("eval", "plots"),
    "yaml": ("dataset", "YAML dataset specs"),
    "pycocotools": ("dataset", "the COCO export"),
    "scipy": ("dataset", "the COCO export's instances"),
    "accelerate": ("dataset", "runs under accelerate launch"),
    "datasets": ("huggingface", "the Hugging Face export"),
}
"""Optional module -> (the opendaam extra that installs it, what needs it)."""


class MissingExtra(RuntimeError):
    """An optional package a command needs is not installed; the message says which extra installs it."""


def missing_extras(*modules: str) -> list[str]:
    """The modules of ``modules`` that are not installed.

    Examples:
        >>> missing_extras("json", "no_such_module_here")
        ['no_such_module_here']
    """
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(*modules: str, command: str) -> None:
    """Raise :class:`MissingExtra` naming the extras to install when any of ``modules`` is missing.

    Examples:
        >>> require("json", command="opendaam evaluate")
    """
    missing = missing_extras(*modules)
    if missing:
        extras = sorted({EXTRAS.get(m, (m, m))[0] for m in missing})
        needs = ", ".join(f"{m} ({EXTRAS.get(m, (m, m))[1]})" for m in missing)
        install = " ".join(f"'opendaam[{e}]'" for e in extras)
        raise MissingExtra(f"{command} needs {needs}: pip install {install}")


def in_range(option: str, value, low=None, high=None, *, integer: bool = False, low_open: bool = False) -> None:
    """Raise ValueError unless ``low <= value <= high`` (``low < value`` with ``low_open``) and finite.

    Examples:
        >>> in_range("--steps", 0, 1, integer=True)
        Traceback (most recent call last):
        ...
        ValueError: --steps must be an integer >= 1, got 0
    """
    if value is None:
        return
    kind = "an integer" if integer else "a number"
    bounds = []
    if low is not None:
        bounds.append(f"> {low}" if low_open else f">= {low}")
    if high is not None:
        bounds.append(f"<= {high}")
    wanted = f"{option} must be {kind} {' and '.join(bounds)}".rstrip()
    if not integer and not math.isfinite(value):
        raise ValueError(f"{wanted}, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{wanted}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{wanted}, got {value}")


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """An output folder that can be made: not an existing file, inside a folder this user may write.

    Examples:
        >>> import tempfile
        >>> check_output_dir(Path(tempfile.mkdtemp()) / "new").name
        'new'
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder; choose a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ValueError(f"{option} {path}: {existing} is a file, so the folder cannot be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{option} {path}: this user may not write to {existing}; choose another folder")
    return path


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """An output file that can be written: not a folder, in a folder this user may write (or may make).

    Examples:
        >>> import tempfile
        >>> check_output_file(Path(tempfile.mkdtemp()) / "t.safetensors").name
        't.safetensors'
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file name such as {path / 'token.safetensors'}")
    check_output_dir(path.parent, option)
    return path


@dataclass(frozen=True)
class ModelInfo:
    """What the config files of a local pipeline folder say (no weights are read)."""

    folder: Path  # the pipeline folder
    vae_factor: int  # image pixels per latent pixel
    size_multiple: int  # image sizes must be multiples of it: the VAE factor and diffusers' 8
    sample_size: int  # the denoiser's native latent size
    max_tokens: int | None  # CLIP context length (start and end included); None where T5 reads the prompt
    family: str = ""  # the attention family (models.DENOISERS)
    tokenizer: str = "tokenizer"  # the tokenizer whose columns start the denoiser's text input (Flux: T5's)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMPONENTS_WITH_WEIGHTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def _weights(folder: Path) -> bool:
    """Whether a component folder holds a weights file."""
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def check_model(name: str, base_dir: str | Path | None = None, option: str = "--model") -> ModelInfo | None:
    """Check a model before loading it: a bundled name, a pipeline folder (every component the folder's
    ``model_index.json`` lists has its folder, config and weights), or a hub id (not checked: None).

    Args:
        name: what the user gave.
        base_dir: folder relative paths are also looked up in (a dataset spec's folder).
        option: the option or spec key named in messages.

    Raises:
        FileNotFoundError: no such folder or bundled model, or the folder lacks a component (named).

    Examples:
        >>> check_model("toy-urban").vae_factor, check_model("toy-urban").size_multiple
        (4, 8)
    """
    from opendaam.models import BUNDLED_MODELS

    if name in BUNDLED_MODELS:
        folder = Path(BUNDLED_MODELS[name])
    else:
        folder = Path(name).expanduser()
        if base_dir is not None and not folder.is_absolute() and (Path(base_dir) / folder).exists():
            folder = Path(base_dir) / folder
        if not folder.exists():
            if _HUB_ID.fullmatch(name) and not name.startswith("."):
                return None  # a hub id: from_pretrained fetches or finds it in the cache
            raise FileNotFoundError(f"{option} {name}: no such folder, bundled model ({', '.join(BUNDLED_MODELS)}) "
                                    "or hub id (org/name)")
    if not folder.is_dir():
        raise FileNotFoundError(f"{option} {name} is a file; give a pipeline folder (written by save_pretrained)")
    index = folder / "model_index.json"
    if not index.exists():
        raise FileNotFoundError(f"{option} {name} is not a diffusers pipeline folder: it has no model_index.json")
    try:
        components = json.loads(index.read_text())
    except ValueError:
        raise FileNotFoundError(f"{option} {name}: model_index.json is not valid JSON") from None
    listed = [k for k, v in components.items() if not k.startswith("_") and isinstance(v, list) and v[0]]
    problems = []
    for component in listed:
        sub = folder / component
        if not sub.is_dir():
            problems.append(f"{component}/ is missing")
        elif component in ("scheduler",) and not (sub / "scheduler_config.json").exists():
            problems.append(f"{component}/scheduler_config.json is missing")
        elif component in _COMPONENTS_WITH_WEIGHTS and not (sub / "config.json").exists():
            problems.append(f"{component}/config.json is missing")
        elif component in _COMPONENTS_WITH_WEIGHTS and not _weights(sub):
            problems.append(f"{component}/ has no weights (*.safetensors)")
    denoiser = "unet" if "unet" in listed else "transformer"
    for needed in (denoiser, "vae", "text_encoder", "tokenizer"):
        if needed not in listed:
            problems.append(f"model_index.json lists no {needed}")
    if problems:
        raise FileNotFoundError(f"{option} {name} is an incomplete pipeline folder: {'; '.join(problems)}")
    from opendaam.models import check_denoiser

    family = check_denoiser(components, f"{option} {name}")  # a denoiser opendaam cannot trace: named here
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        net = json.loads((folder / denoiser / "config.json").read_text())
        encoder = json.loads((folder / "text_encoder" / "config.json").read_text())
    except ValueError as error:
        raise FileNotFoundError(f"{option} {name}: a component config is not valid JSON ({error})") from None
    factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
    clip = denoiser == "unet"  # U-Nets read CLIP's 77 columns; the transformers' prompts are read by T5 as well
    max_tokens = encoder.get("max_position_embeddings") if clip else None
    tokenizer = "tokenizer_2" if "Flux" in components.get("transformer", ["", ""])[1] else "tokenizer"
    return ModelInfo(folder, factor, max(factor, 8), int(net.get("sample_size") or 64), max_tokens, family,
                     tokenizer)


def check_size(info: ModelInfo | None, height: int | None, width: int | None, where: str = "--") -> None:
    """Positive sizes that are multiples of 8 (diffusers' Stable Diffusion pipelines) and of the VAE factor.

    Examples:
        >>> check_size(ModelInfo(Path("."), 8, 8, 64, 77), 60, None)
        Traceback (most recent call last):
        ...
        ValueError: --height 60 is not a multiple of 8 (diffusers' pipelines and the model's VAE factor 8): use 56 or 64
    """
    for key, value in (("height", height), ("width", width)):
        if value is None:
            continue
        in_range(f"{where}{key}", value, 1, integer=True)
        step = info.size_multiple if info is not None else 8
        if value % step:
            down = value // step * step
            options = f"{down} or {down + step}" if down else str(step)
            factor = f" and the model's VAE factor {info.vae_factor}" if info is not None else ""
            raise ValueError(f"{where}{key} {value} is not a multiple of {step} (diffusers' pipelines{factor}): "
                             f"use {options}")


def _tokenizer(info: ModelInfo):
    """The model's tokenizer, read from its folder (no weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(info.folder / info.tokenizer))


def check_prompt(info: ModelInfo | None, prompts: list[str], words: list[str] | None = None,
                 what: str = "prompt") -> None:
    """Prompts within the text encoder's context; ``words`` (DAAM) present in the (single) prompt.

    Raises:
        ValueError: a prompt is empty or too long, or a word is not in the prompt (its words listed).

    Examples:
        >>> check_prompt(check_model("toy-urban"), ["a car in an urban environment"], ["car"])
    """
    for prompt in prompts:
        if not prompt.strip():
            raise ValueError(f"the {what} is empty; give the text to generate, e.g. 'a car in an urban environment'")
    if info is None:
        return
    tokenizer = _tokenizer(info)
    limit = min(tokenizer.model_max_length, info.max_tokens or tokenizer.model_max_length)
    for prompt in prompts if info.max_tokens is not None else ():  # T5 families truncate as their pipeline does
        count = len(tokenizer(prompt, truncation=False).input_ids)
        if count > limit:
            raise ValueError(f"the {what} has {count} tokens but the text encoder reads at most {limit} (start and "
                             f"end included); shorten it: {prompt[:60]!r}...")
    if words:
        from opendaam.heatmaps import find_tokens

        tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompts[0], truncation=False).input_ids)
        for word in words:
            try:
                find_tokens(tokens, word)
            except KeyError as error:
                message = str(error.args[0]).replace("use method='open_vocab' or method='linear'",
                                                     "use --method open_vocab or --method linear")
                raise ValueError(f"--words: {message}") from None


def check_record_file(path: str | Path) -> dict:
    """The header of an opendaam record file (read without its tensors).

    Raises:
        ValueError: ``not an opendaam record: <path> (<why>)`` for truncated, foreign or corrupt files.

    Examples:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "x.safetensors"; _ = bad.write_bytes(b"not safetensors")
        >>> check_record_file(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: not an opendaam record: ...x.safetensors (...)
    """
    return _safetensors_header(path, "opendaam", "record")


def check_token_file(path: str | Path) -> dict:
    """The header of an opendaam token file (read without its tensors).

    Raises:
        FileNotFoundError: no such file.
        ValueError: ``not an opendaam token file: <path> (<why>)``.

    Examples:
        >>> import tempfile
        >>> bad = Path(tempfile.mkdtemp()) / "t.safetensors"; _ = bad.write_text("hello")
        >>> check_token_file(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: not an opendaam token file: ...t.safetensors (...)
    """
    return _safetensors_header(path, "opendaam_token", "token file")


def _safetensors_header(path: str | Path, key: str, kind: str) -> dict:
    """The JSON header stored under ``key`` in a safetensors file's metadata, and a check that every tensor
    it holds can be read (a truncated file fails here)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for files that are not safetensors
        raise ValueError(f"not an opendaam {kind}: {path} ({str(error).splitlines()[0][:100]})") from None
    if key not in metadata:
        raise ValueError(f"not an opendaam {kind}: {path} (a safetensors file without opendaam's metadata)")
    try:
        header = json.loads(metadata[key])
    except ValueError:
        raise ValueError(f"not an opendaam {kind}: {path} (its metadata is not valid JSON)") from None
    if not isinstance(header, dict) or not names:
        raise ValueError(f"not an opendaam {kind}: {path} (no tensors or no header)")
    return header
