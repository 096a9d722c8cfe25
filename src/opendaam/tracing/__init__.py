"""Record cross-attention while a diffusers pipeline generates.

* :mod:`~opendaam.tracing.adapters`: where a denoiser's text-conditioned attention layers are (one class per
  attention family);
* :mod:`~opendaam.tracing.hooks`: installing and restoring processors and hooks, step boundaries, conditional
  rows, the text encoders' calls;
* :mod:`~opendaam.tracing.recorders`: one class per thing recorded (DAAM sums, per-step DAAM, query cache,
  linear matrix M);
* :mod:`~opendaam.tracing.records`: the :class:`Record` they fill, and its file format;
* :mod:`~opendaam.tracing.tracer`: :func:`trace`, the context manager that ties them together.

Second layer of opendaam: imports only :mod:`opendaam.models`, :mod:`opendaam.attention` and ``_io``.
"""

from opendaam.attention import upsample
from opendaam.tracing.adapters import adapter_for
from opendaam.tracing.recorders import build_linear_map
from opendaam.tracing.records import FORMAT_VERSION, LayerInfo, Record, store_queries
from opendaam.tracing.tracer import TraceConfig, Tracer, tokenize_prompt, trace

__all__ = [
    "FORMAT_VERSION",
    "LayerInfo",
    "Record",
    "TraceConfig",
    "Tracer",
    "adapter_for",
    "build_linear_map",
    "store_queries",
    "tokenize_prompt",
    "trace",
    "upsample",
]
