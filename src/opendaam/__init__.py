"""opendaam: word-to-pixel attribution maps from the cross-attention of diffusion models."""

from opendaam.models import build_pipeline, clip_tokenizer, load_pipeline, set_threads

__all__ = ["build_pipeline", "clip_tokenizer", "load_pipeline", "set_threads"]
__version__ = "0.1.0"
