"""opendaam: word-to-pixel attribution maps from the cross-attention of diffusion models."""

import importlib

from opendaam.cache import load_record
from opendaam.heatmaps import METHODS, Heatmaps, heatmaps
from opendaam.models import build_pipeline, clip_tokenizer, load_pipeline, set_threads
from opendaam.optimize import OptimizeConfig, OptimizedToken, load_token, nearest_words, optimize_token
from opendaam.tracing import Record, TraceConfig, trace

__all__ = [
    "METHODS",
    "Heatmaps",
    "OptimizeConfig",
    "OptimizedToken",
    "Record",
    "TraceConfig",
    "build_pipeline",
    "clip_tokenizer",
    "heatmaps",
    "load_pipeline",
    "load_record",
    "load_token",
    "nearest_words",
    "optimize_token",
    "set_threads",
    "trace",
]
__version__ = "0.1.0"

_SUBPACKAGES = ("dataset", "experiments", "metrics", "toyworld", "viz")


def __getattr__(name: str):
    """``opendaam.metrics``, ``opendaam.toyworld``, ... after a plain ``import opendaam``, imported on first use."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"opendaam.{name}")
    raise AttributeError(f"module 'opendaam' has no attribute {name!r}")
