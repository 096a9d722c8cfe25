"""Dataset specs: a YAML (or TOML) file validated into a tree of frozen dataclasses.

A spec says which model generates, with which settings, which classes are labelled, from which prompt
templates and seeds, how maps become labels and which exports are written. Unknown keys and wrong types
are errors that name the key and the expected type.

Templates name classes in braces: ``"a {car} and a {person} in an urban environment"``. A placeholder is
replaced by the class' ``text`` (its name unless given) and that class is labelled in the image; ``{}``
in a class' own ``prompts`` stands for that class; ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from opendaam.dataset.cityscapes import CITYSCAPES_IDS
from opendaam.generation import Item

__all__ = [
    "MAX_ITEMS",
    "MAX_SEED",
    "ClassSpec",
    "DatasetSpec",
    "FilterSpec",
    "Item",
    "ModelSpec",
    "OutputSpec",
    "SeedRange",
    "SpecError",
    "RefineSpec",
    "Thresholds",
    "check_files",
    "expand_items",
    "item_count",
    "load_spec",
    "parse_spec",
    "render_template",
    "rendered_prompts",
    "spec_hash",
]

METHODS = ("daam", "open_vocab", "linear")
FORMATS = ("cityscapes", "coco", "huggingface")
MAX_SEED = 2**63 - 1
"""Largest seed: seeds are 0 .. 2**63 - 1, the int64 range every export stores them in (torch's generator
would also take negative seeds and seeds up to 2**64 - 1, but -1 and 2**64 - 1 give the same image)."""
MAX_ITEMS = 1_000_000
"""Most items one spec may have (prompts x seeds); split larger datasets into several specs."""
_SPLIT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_]{0,63}")  # Cityscapes folder, COCO file part, Hugging Face split
_CITY = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # Cityscapes separates the parts of file names with "_"


class SpecError(ValueError):
    """A dataset spec is invalid; the message names the key and what was expected."""


@dataclass(frozen=True)
class ModelSpec:
    """Which diffusion model generates the images."""

    id: str = "toy-urban"  # the bundled model runs offline on a CPU in seconds
    revision: str | None = None  # None: the hub's default branch (the commit is still recorded when known)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None  # None: the checkpoint's own dtype


@dataclass(frozen=True)
class ClassSpec:
    """One labelled class."""

    name: str  # label name: exports, manifest and card use it
    prompts: tuple[str, ...] = ()  # templates for images of this class; most classes have one or two
    text: str | None = None  # words put into prompts for ``{name}``; None: the name itself
    words: tuple[str, ...] = ()  # words whose maps are averaged (open_vocab/linear); empty: the text
    token: str | None = None  # optimized token file (open_vocab/linear), relative to the spec's folder
    cityscapes_id: int | None = None  # None: looked up by name in the Cityscapes label table

    @property
    def prompt_text(self) -> str:
        """The text that replaces ``{name}`` in templates."""
        return self.text or self.name


@dataclass(frozen=True)
class SeedRange:
    """Seeds ``start, start + 1, ..., start + count - 1``."""

    start: int = 0  # the thesis starts at seed 0
    count: int = 1  # one image per template unless asked for more


@dataclass(frozen=True)
class Thresholds:
    """Confidence band on the normalized maps: above ``high`` a class, below ``low`` background, else ignore."""

    low: float = 0.3  # DAAM's tau is 0.4; 0.1 either side keeps the uncertain rim out of training
    high: float = 0.5  # see ``low``
    mode: Literal["fixed", "adaptive"] = "fixed"  # "adaptive": an Otsu threshold per image and class instead
    margin: float = 0.1  # adaptive: the uncertain band, as a share of the way from the threshold to 1 and to 0
    min_gap: float = 0.1  # adaptive: a pixel two classes claim within this gap is ignored


@dataclass(frozen=True)
class RefineSpec:
    """Self-attention refinement of the class maps before labelling (``opendaam.refine``)."""

    layers: tuple[str, ...]  # self-attention layers of one size (names, prefixes, presets): N^2 floats each
    power: int = 1  # propagation steps; on toy-urban one step helped and more washed maps out


@dataclass(frozen=True)
class FilterSpec:
    """Which items are dropped from the exports (they stay on disk and in the manifest)."""

    area_percentiles: tuple[float, float] | None = None  # None keeps all; (5, 95) is OVAM's choice
    min_confidence: float | None = None  # None keeps all; else drop items with a weaker mask


@dataclass(frozen=True)
class OutputSpec:
    """Which exports are written after generation, and their naming."""

    formats: tuple[Literal["cityscapes", "coco", "huggingface"], ...] = (
        "cityscapes", "coco")  # what trainers read ("huggingface" needs the datasets package)
    split: str = "train"  # Cityscapes split folder the items land in
    city: str | None = None  # Cityscapes "city" folder and file prefix; None: the dataset name
    background_id: int = 0  # Cityscapes label id of background pixels; 0 ("unlabeled") is ignored in training


@dataclass(frozen=True)
class DatasetSpec:
    """A whole dataset: model, sampling, classes, prompts, seeds, labelling and outputs.

    Examples:
        >>> spec = parse_spec({"model": "toy-urban", "seeds": [0, 1],
        ...                    "classes": [{"name": "car", "prompts": ["a {} in the city"]}]})
        >>> [(it.prompt, it.seed) for it in expand_items(spec)]
        [('a car in the city', 0), ('a car in the city', 1)]
    """

    classes: tuple[ClassSpec, ...]  # at least one class; their order gives the label ids 1..K
    name: str = "opendaam"  # names the card and the Cityscapes city folder
    model: ModelSpec | str = ModelSpec()  # a string is short for {id: ...}
    scheduler: str | None = None  # None: the model's own scheduler
    steps: int | None = None  # None: the model's own default
    guidance: float | None = None  # None: the model's own default
    height: int | None = None  # None: the model's native size
    width: int | None = None  # None: the model's native size
    prompts: tuple[str, ...] = ()  # multi-class templates, on top of the classes' own
    seeds: tuple[int, ...] | SeedRange = SeedRange()  # list of seeds or {start, count}
    method: Literal["daam", "open_vocab", "linear"] = "daam"  # DAAM needs the class words in the prompt
    normalize: Literal["max", "minmax"] | None = None  # None: minmax for linear maps, max otherwise
    thresholds: Thresholds = Thresholds()  # see Thresholds
    refine: RefineSpec | None = None  # None: the maps as traced
    filter: FilterSpec = FilterSpec()  # see FilterSpec
    outputs: OutputSpec = OutputSpec()  # see OutputSpec
    base_dir: str = field(default=".", compare=False)  # folder token paths are relative to (not a key)

    @property
    def model_spec(self) -> ModelSpec:
        """The model as a :class:`ModelSpec` (the string shorthand expanded)."""
        return self.model if isinstance(self.model, ModelSpec) else ModelSpec(id=self.model)

    @property
    def seed_count(self) -> int:
        """How many seeds (without listing them)."""
        return self.seeds.count if isinstance(self.seeds, SeedRange) else len(self.seeds)

    @property
    def seed_list(self) -> list[int]:
        """The seeds in order."""
        if isinstance(self.seeds, SeedRange):
            return list(range(self.seeds.start, self.seeds.start + self.seeds.count))
        return list(self.seeds)

    @property
    def class_names(self) -> list[str]:
        """Class names in label-id order (label id = position + 1)."""
        return [c.name for c in self.classes]

    def token_path(self, cls: ClassSpec) -> Path | None:
        """Absolute path of a class' token file, if it has one."""
        if cls.token is None:
            return None
        path = Path(cls.token).expanduser()
        return path if path.is_absolute() else Path(self.base_dir) / path


# -- validation ---------------------------------------------------------------------------------------


def _describe(tp) -> str:
    """A human description of a type hint, for error messages."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        keys = ", ".join(f.name for f in dataclasses.fields(tp) if f.name != "base_dir")
        return f"a mapping with keys {keys}"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            inner = _describe(args[0])
            plural = {"a string": "strings", "an integer": "integers", "a number": "numbers"}
            return f"a list of {plural.get(inner, '(' + inner + ')')}"
        return f"a list of {len(args)} values (" + ", ".join(_describe(a) for a in args) + ")"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    return str(tp)


def _got(value) -> str:
    """What a wrong value was, for error messages."""
    kind = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text if len(text) < 40 else text[:37] + '...'}"


def _convert(value, tp, key: str):
    """``value`` checked against the type hint ``tp``; raises :class:`SpecError` naming ``key``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for alt in args:
            if alt is type(None):
                continue
            if isinstance(value, dict) and dataclasses.is_dataclass(alt):
                return _convert(value, alt, key)  # a mapping can only mean this: report its own errors
            try:
                return _convert(value, alt, key)
            except SpecError:
                continue
        raise SpecError(f"spec key {key!r}: expected {_describe(tp)}, got {_got(value)}")
    if tp is type(None):
        if value is not None:
            raise SpecError(f"spec key {key!r}: expected null, got {_got(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"spec key {key!r}: expected {_describe(tp)}, got {_got(value)}")
        return _build(tp, value, key)
    if origin is Literal:
        if value not in args:
            raise SpecError(f"spec key {key!r}: expected {_describe(tp)}, got {_got(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"spec key {key!r}: expected {_describe(tp)}, got {_got(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise SpecError(f"spec key {key!r}: expected {_describe(tp)}, got {_got(value)}")
        return tuple(_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(f"spec key {key!r}: expected a boolean, got {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(f"spec key {key!r}: expected an integer, got {_got(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(f"spec key {key!r}: expected a number, got {_got(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(f"spec key {key!r}: expected a string, got {_got(value)}")
        return value
    raise TypeError(f"unsupported type hint {tp!r}")  # a bug in the dataclasses, not in the spec


def _build(cls, data: dict, prefix: str = ""):
    """A dataclass ``cls`` from a mapping, rejecting unknown keys and missing required ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name != "base_dir"]
    where = f"{prefix}." if prefix else ""
    for key in data:
        if key not in names:
            raise SpecError(f"unknown spec key '{where}{key}'; allowed keys here: {', '.join(names)}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name == "base_dir":
            continue
        if f.name in data:
            values[f.name] = _convert(data[f.name], hints[f.name], f"{where}{f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise SpecError(f"spec key {where}{f.name!r} is required ({_describe(hints[f.name])})")
    return cls(**values)


_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}")


def render_template(template: str, classes: dict[str, str], own: str | None = None) -> tuple[str, list[str]]:
    """Fill a template's ``{class}`` placeholders; returns the prompt and the classes it names.

    Args:
        template: text with ``{name}`` placeholders (``{{``/``}}`` for literal braces).
        classes: class name -> text put into the prompt.
        own: the class ``{}`` stands for (a class' own templates).

    Raises:
        SpecError: a placeholder names no class, or a brace is unbalanced.

    Examples:
        >>> render_template("a {car} and a {traffic light}", {"car": "car", "traffic light": "traffic light"})
        ('a car and a traffic light', ['car', 'traffic light'])
    """
    named: list[str] = []

    def fill(match: re.Match) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        name = match.group(1).strip() or own
        if name is None:
            raise SpecError(f"template {template!r}: '{{}}' only works in a class' own prompts")
        if name not in classes:
            raise SpecError(f"template {template!r} names unknown class {name!r}; classes: {', '.join(classes)}")
        if name not in named:
            named.append(name)
        return classes[name]

    rendered = _PLACEHOLDER.sub(fill, template)
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        raise SpecError(f"template {template!r} has an unbalanced brace (write {{{{ or }}}} for a literal one)")
    return rendered, named


def _check(spec: DatasetSpec) -> DatasetSpec:
    """Cross-field checks that types alone cannot express."""
    if not spec.classes:
        raise SpecError("spec key 'classes': expected at least one class")
    names = spec.class_names
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SpecError(f"spec key 'classes': duplicate class names {', '.join(duplicates)}")
    texts = {c.name: c.prompt_text for c in spec.classes}
    prompted: set[str] = set()
    for i, cls in enumerate(spec.classes):
        key = f"classes[{i}]"
        if not cls.name.strip():
            raise SpecError(f"spec key '{key}.name': expected a non-empty string")
        if any(c in cls.name for c in "/\\") or cls.name.strip() in (".", "..") or \
                any(ord(c) < 32 for c in cls.name):
            raise SpecError(f"spec key '{key}.name': {cls.name!r} cannot name files (no '/', '\\', control "
                            "characters, '.' or '..'); use words such as 'traffic light'")
        for template in cls.prompts:
            _, named = render_template(template, texts, own=cls.name)
            if cls.name not in named:
                raise SpecError(f"spec key '{key}.prompts': template {template!r} does not name its class; "
                                f"write {{}} or {{{cls.name}}} where the class goes")
            prompted.update(named)
        if cls.token is not None and spec.method == "daam":
            raise SpecError(f"spec key '{key}.token': an optimized token is not in the prompt, so DAAM cannot "
                            "map it; use method open_vocab or linear")
        if cls.words and spec.method == "daam":
            raise SpecError(f"spec key '{key}.words': DAAM maps the class' text in the prompt; words are for "
                            "method open_vocab or linear")
        if cls.cityscapes_id is not None and cls.cityscapes_id not in CITYSCAPES_IDS:
            raise SpecError(f"spec key '{key}.cityscapes_id': {cls.cityscapes_id} is not a Cityscapes label id "
                            "(0..33)")
    for i, template in enumerate(spec.prompts):
        _, named = render_template(template, texts)
        if not named:
            raise SpecError(f"spec key 'prompts[{i}]': template {template!r} names no class; "
                            "write class names in braces, e.g. 'a {car} on a street'")
        prompted.update(named)
    missing = [n for n in names if n not in prompted]
    if missing:
        raise SpecError(f"class {missing[0]!r} has no prompt: give it prompts: ['a {{}} ...'] or name it as "
                        f"{{{missing[0]}}} in a top-level prompt")
    _check_seeds(spec, len(spec.prompts) + sum(len(c.prompts) for c in spec.classes))
    for key, value in (("steps", spec.steps), ("height", spec.height), ("width", spec.width)):
        if value is not None and value <= 0:
            raise SpecError(f"spec key {key!r}: expected a positive integer, got {value}")
    if spec.guidance is not None and not (math.isfinite(spec.guidance) and spec.guidance >= 0):
        raise SpecError(f"spec key 'guidance': expected a number >= 0 (1 turns guidance off), got {spec.guidance}")
    if spec.scheduler is not None:
        from opendaam.models import SCHEDULERS

        if spec.scheduler.lower() not in SCHEDULERS:
            raise SpecError(f"spec key 'scheduler': unknown scheduler {spec.scheduler!r}; choose one of: "
                            f"{', '.join(SCHEDULERS)}")
    if not _SPLIT.fullmatch(spec.outputs.split):
        raise SpecError(f"spec key 'outputs.split': {spec.outputs.split!r} is not a split name (letters, digits "
                        "and '_', e.g. train, val, test); it names export folders and files")
    if spec.outputs.city is not None and not _CITY.fullmatch(spec.outputs.city):
        raise SpecError(f"spec key 'outputs.city': {spec.outputs.city!r} is not a Cityscapes city name (lower-case "
                        "letters, digits and '-'); it names export folders and files")
    low, high = spec.thresholds.low, spec.thresholds.high
    if not 0.0 <= low <= high <= 1.0:
        raise SpecError(f"spec key 'thresholds': expected 0 <= low <= high <= 1, got low={low}, high={high}")
    for key in ("margin", "min_gap"):
        value = getattr(spec.thresholds, key)
        if not 0.0 <= value <= 1.0:
            raise SpecError(f"spec key 'thresholds.{key}': expected a number in [0, 1], got {value}")
    if spec.refine is not None and (not spec.refine.layers or spec.refine.power < 1):
        raise SpecError("spec key 'refine': give layers (e.g. [up_blocks.1]) and a power >= 1, got "
                        f"layers={list(spec.refine.layers)}, power={spec.refine.power}")
    confidence = spec.filter.min_confidence
    if confidence is not None and not 0.0 <= confidence <= 1.0:
        raise SpecError(f"spec key 'filter.min_confidence': expected a number in [0, 1], got {confidence}")
    band = spec.filter.area_percentiles
    if band is not None and not 0.0 <= band[0] <= band[1] <= 100.0:
        raise SpecError(f"spec key 'filter.area_percentiles': expected 0 <= low <= high <= 100, got {list(band)}")
    if spec.outputs.background_id not in CITYSCAPES_IDS:
        raise SpecError(f"spec key 'outputs.background_id': {spec.outputs.background_id} is not a Cityscapes "
                        "label id (0..33)")
    templates = [(t, c.name) for c in spec.classes for t in c.prompts] + [(t, None) for t in spec.prompts]
    rendered = [_render_any(spec, t, own)[0] for t, own in templates]
    repeated = sorted({p for p in rendered if rendered.count(p) > 1})
    if repeated:
        raise SpecError(f"prompt {repeated[0]!r} is given twice; each template must render a different prompt")
    return spec


def _check_seeds(spec: DatasetSpec, templates: int) -> None:
    """Seeds in 0..MAX_SEED, distinct, and at most MAX_ITEMS items, checked without listing a seed range."""
    if isinstance(spec.seeds, SeedRange):
        start, count = spec.seeds.start, spec.seeds.count
        if count <= 0:
            raise SpecError(f"spec key 'seeds.count': expected a positive integer, got {count}")
        if start < 0 or start + count - 1 > MAX_SEED:
            raise SpecError(f"spec key 'seeds': seeds {start} .. {start + count - 1} leave the valid range "
                            f"0 .. {MAX_SEED} (2**63 - 1)")
    else:
        if not spec.seeds:
            raise SpecError("spec key 'seeds': expected at least one seed")
        bad = [s for s in spec.seeds if not 0 <= s <= MAX_SEED]
        if bad:
            raise SpecError(f"spec key 'seeds': seed {bad[0]} is outside the valid range 0 .. {MAX_SEED} "
                            "(2**63 - 1)")
        if len(set(spec.seeds)) != len(spec.seeds):
            raise SpecError("spec key 'seeds': seeds repeat")
    if templates * spec.seed_count > MAX_ITEMS:
        raise SpecError(f"spec has {templates} prompts x {spec.seed_count} seeds = {templates * spec.seed_count} "
                        f"items, more than the {MAX_ITEMS} one spec may have; split it into several specs")


def item_count(spec: DatasetSpec) -> int:
    """How many items :func:`expand_items` gives, without listing them.

    Examples:
        >>> item_count(parse_spec({"classes": [{"name": "car", "prompts": ["a {}", "two {}"]}], "seeds": [1, 2]}))
        4
    """
    return (len(spec.prompts) + sum(len(c.prompts) for c in spec.classes)) * spec.seed_count


def rendered_prompts(spec: DatasetSpec) -> list[str]:
    """Every prompt of the spec once, in item order (the classes' templates, then the top-level ones).

    Examples:
        >>> rendered_prompts(parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}], "seeds": [1, 2]}))
        ['a car']
    """
    templates = [(t, c.name) for c in spec.classes for t in c.prompts] + [(t, None) for t in spec.prompts]
    return [_render_any(spec, t, own)[0] for t, own in templates]


def check_files(spec: DatasetSpec) -> None:
    """Check the files a spec names: every class' token file exists and is an opendaam token.

    Raises:
        SpecError: a token file is missing or is not an opendaam token file (naming the class and file).

    Examples:
        >>> check_files(parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}]}))
    """
    for i, cls in enumerate(spec.classes):
        path = spec.token_path(cls)
        if path is None:
            continue
        if not path.is_file():
            raise SpecError(f"spec key 'classes[{i}].token': no token file at {path}")
        from opendaam.optimize import load_token

        try:
            load_token(path)
        except Exception as error:  # safetensors raises its own error type on files that are not safetensors
            raise SpecError(f"spec key 'classes[{i}].token': {path} is not an opendaam token file "
                            f"({str(error).splitlines()[0][:120]}); write one with opendaam optimize") from None


def _render_any(spec: DatasetSpec, template: str, own: str | None = None) -> tuple[str, list[str]]:
    """Render a class or top-level template with the spec's class texts."""
    return render_template(template, {c.name: c.prompt_text for c in spec.classes}, own=own)


def parse_spec(data: dict, base_dir: str | Path = ".") -> DatasetSpec:
    """Validate a spec given as a mapping (parsed YAML or TOML).

    Args:
        data: the spec's top-level mapping.
        base_dir: folder that relative token paths are read from.

    Raises:
        SpecError: unknown key, wrong type, a class without prompt, bad thresholds, ...

    Examples:
        >>> parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}], "steps": "ten"})
        Traceback (most recent call last):
        ...
        opendaam.dataset.spec.SpecError: spec key 'steps': expected an integer or null, got a string 'ten'
    """
    if not isinstance(data, dict):
        raise SpecError(f"a dataset spec is a mapping of keys to values, got {_got(data)}")
    spec = _build(DatasetSpec, data)
    spec = dataclasses.replace(spec, base_dir=str(Path(base_dir).resolve()))
    if isinstance(spec.model, str):
        spec = dataclasses.replace(spec, model=ModelSpec(id=spec.model))
    return _check(spec)


def load_spec(path: str | Path) -> DatasetSpec:
    """Read and validate a spec file (``.yaml``/``.yml`` or ``.toml``), including the token files it names.

    Raises:
        FileNotFoundError: no such file.
        SpecError: the file does not parse or does not validate.

    Examples:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "spec.yaml")
        >>> _ = open(path, "w").write("classes:\\n  - name: car\\n    prompts: ['a {} on a street']\\n")
        >>> load_spec(path).classes[0].name
        'car'
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no dataset spec at {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpecError(f"{path} is not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    if path.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise SpecError(f"{path} is not valid TOML: {error}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise SpecError("reading YAML specs needs pyyaml: pip install 'opendaam[dataset]'") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise SpecError(f"{path} is not valid YAML: {error}") from None
    try:
        spec = parse_spec(data if data is not None else {}, base_dir=path.parent)
        check_files(spec)
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None
    return spec


def spec_to_dict(spec: DatasetSpec) -> dict[str, Any]:
    """The spec as plain JSON-able data (tuples as lists, ``base_dir`` left out).

    Examples:
        >>> spec_to_dict(parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}]}))["model"]["id"]
        'toy-urban'
    """
    data = dataclasses.asdict(spec)
    data.pop("base_dir", None)
    return json.loads(json.dumps(data))


def _generation_part(spec: DatasetSpec) -> dict[str, Any]:
    """The keys that decide the items' files (filters and exports can change without regenerating)."""
    data = spec_to_dict(spec)
    data.pop("filter")
    data.pop("outputs")
    data.pop("name")
    return data


def spec_hash(spec: DatasetSpec) -> str:
    """SHA-256 of what decides the generated items: the spec without filters and exports, plus the
    content of token files (a changed token file is a different dataset).

    Examples:
        >>> a = parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}]})
        >>> b = parse_spec({"classes": [{"name": "car", "prompts": ["a {}"]}], "outputs": {"formats": ["coco"]}})
        >>> spec_hash(a) == spec_hash(b), len(spec_hash(a))
        (True, 64)
    """
    data = _generation_part(spec)
    tokens = {}
    for cls in spec.classes:
        path = spec.token_path(cls)
        if path is not None:
            if not path.exists():
                raise FileNotFoundError(f"class {cls.name!r}: no token file at {path}")
            tokens[cls.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    data["token_sha256"] = tokens
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def expand_items(spec: DatasetSpec) -> list[Item]:
    """Every (prompt, seed) of the dataset, in a fixed order: the classes' own templates in class order,
    then the top-level templates, each with every seed.

    Examples:
        >>> spec = parse_spec({"classes": [{"name": "car"}, {"name": "person"}], "seeds": [3],
        ...                    "prompts": ["a {person} next to a {car}"]})
        >>> [(it.index, it.prompt, it.classes) for it in expand_items(spec)]
        [(0, 'a person next to a car', ('car', 'person'))]
    """
    order = {name: i for i, name in enumerate(spec.class_names)}
    templates: list[tuple[str, str | None]] = [(t, c.name) for c in spec.classes for t in c.prompts]
    templates += [(t, None) for t in spec.prompts]
    items = []
    for template, own in templates:
        prompt, named = _render_any(spec, template, own)
        classes = tuple(sorted(named, key=order.__getitem__))
        for seed in spec.seed_list:
            items.append(Item(len(items), prompt, template, seed, classes))
    return items
