"""Native kernels for open-vocabulary token optimization on int8 query caches, compiled at first use.

``assets/kernels/ov_int8.c`` (C with AVX-512 VNNI intrinsics) is compiled once per machine and source
version with the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into ``$OPENDAAM_CACHE`` (default
``~/.cache/opendaam``), loaded with :mod:`ctypes` and checked against a float64 reference before first
use. Without a compiler, on another CPU or with ``OPENDAAM_NATIVE=0``, :func:`available` is ``False`` and
callers use torch. ctypes releases the GIL during a call, so heads run in parallel threads when torch is
allowed more than one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "int8_backward", "int8_forward"]

_FLAGS = ["-O3", "-march=native", "-fPIC", "-shared"]


def _cache_dir() -> Path:
    """Where compiled kernels are kept."""
    root = os.environ.get("OPENDAAM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "opendaam")
    return Path(root) / "kernels"


def _cpu_signature() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on the same kind of CPU)."""
    lines = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags")):
                    lines.append(line.strip())
                if len(lines) >= 2:
                    break
    except OSError:
        pass
    return platform.machine() + "\n" + "\n".join(lines)


def _compile(source: Path) -> Path | None:
    """The shared library of ``source`` for this machine, compiled now unless cached; ``None`` if it fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), " ".join(_FLAGS).encode(),
                                     _cpu_signature().encode()])).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "opendaam-kernels"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / target.name
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            return None
        os.replace(tmp, target)  # atomic: a concurrent process sees the old state or the whole library
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded and self-checked kernel library, or ``None`` when it cannot be used here."""
    if os.environ.get("OPENDAAM_NATIVE", "1").lower() in ("0", "false", "no", "off"):
        return None
    with resources.as_file(resources.files("opendaam") / "assets" / "kernels" / "ov_int8.c") as source:
        path = _compile(Path(source))
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.ov_int8_forward.argtypes = [pointer, pointer, pointer, size, size, size, size, size, pointer, pointer]
    lib.ov_int8_backward.argtypes = [pointer, pointer, pointer, pointer, size, size, size, size, size, pointer]
    lib.ov_int8_forward.restype = lib.ov_int8_backward.restype = ctypes.c_int
    if not _self_check(lib):
        warnings.warn("opendaam's native int8 kernels disagree with the float reference on this machine; "
                      "using torch instead", RuntimeWarning, stacklevel=2)
        return None
    return lib


def _reference(codes: Tensor, scales: Tensor, v: Tensor, g: Tensor, steps: int, n: int) -> tuple[Tensor, Tensor]:
    """Map and gradient in float64 (what the kernels compute)."""
    s = torch.einsum("hrd,hd->hr", codes.double(), v.double()) * scales.double()  # (H, R)
    prob = torch.sigmoid(s)
    weight = (prob * (1 - prob)).view(-1, steps, n) * g.double() * scales.double().view(-1, steps, n)
    grad = torch.einsum("hr,hrd->hd", weight.flatten(1), codes.double())  # (H, d)
    return prob.view(-1, steps, n).sum((0, 1)), grad


def _self_check(lib: ctypes.CDLL) -> bool:
    """Whether the library matches :func:`_reference` on small problems of several shapes and tails."""
    gen = torch.Generator().manual_seed(0)
    for heads, steps, n, d in ((2, 3, 16, 16), (3, 2, 5, 48), (1, 4, 100, 64), (2, 1, 37, 80), (1, 2, 16, 128)):
        codes = torch.randint(-127, 128, (heads, steps * n, d), generator=gen, dtype=torch.int8)
        scales = (torch.rand(heads, steps * n, generator=gen) * 0.02).half()
        v = torch.randn(heads, d, generator=gen)
        g = torch.randn(n, generator=gen)
        want_map, want_grad = _reference(codes, scales, v, g, steps, n)
        prob, got_map = _forward(lib, codes, scales, v, steps, n, threads=1)
        got_grad = _backward(lib, codes, scales, prob, g, steps, n, threads=1)
        if not (torch.allclose(got_map.double(), want_map, rtol=1e-4, atol=1e-4 * float(want_map.abs().max()))
                and torch.allclose(got_grad.double(), want_grad, atol=5e-3 * float(want_grad.abs().max()))):
            return False
    return True


@functools.lru_cache(maxsize=1)
def _pool(threads: int) -> ThreadPoolExecutor:
    """A persistent thread pool of ``threads`` workers (a pool per call costs more than small layers)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="opendaam-kernel")


def _run(calls, threads: int) -> None:
    """Run the kernel calls, spread over ``threads`` threads when more than one."""
    if threads > 1 and len(calls) > 1:
        codes = list(_pool(threads).map(lambda call: call(), calls))
    else:
        codes = [call() for call in calls]
    if any(code != 0 for code in codes):
        raise RuntimeError(f"native kernel failed with codes {codes}")


def _tasks(heads: int, steps: int, threads: int) -> list[tuple[int, int, int, int]]:
    """``(h0, h1, t0, t1)`` pieces of the (head, step) grid, one per thread: groups of whole heads when there
    are enough heads, else each head cut into step ranges (many small calls cost more than they save)."""
    if threads <= 1:
        return [(0, heads, 0, steps)]
    if heads >= threads:
        bounds = [heads * i // threads for i in range(threads + 1)]
        return [(a, b, 0, steps) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]
    parts = max(1, min(steps, -(-threads // heads)))
    bounds = [steps * i // parts for i in range(parts + 1)]
    return [(h, h + 1, a, b) for h in range(heads) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _forward(lib, codes: Tensor, scales: Tensor, v: Tensor, steps: int, n: int, threads: int,
             out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Kernel forward over all heads (into ``out`` when given)."""
    heads, rows, d = codes.shape
    tasks = _tasks(heads, steps, threads)
    prob = torch.empty(heads, rows, dtype=torch.float16) if out is None else out  # (H, S*N), for the gradient
    maps = torch.zeros(len(tasks), n)  # (tasks, N), summed below
    calls = []
    for k, (h0, h1, t0, t1) in enumerate(tasks):
        row = h0 * rows + t0 * n  # first row of the piece
        calls.append(functools.partial(
            lib.ov_int8_forward, codes.data_ptr() + row * d, scales.data_ptr() + 2 * row, v[h0].data_ptr(),
            h1 - h0, rows, t1 - t0, n, d, prob.data_ptr() + 2 * row, maps[k].data_ptr()))
    _run(calls, threads)
    return prob, maps.sum(0) if len(tasks) > 1 else maps[0]


def _backward(lib, codes: Tensor, scales: Tensor, prob: Tensor, g: Tensor, steps: int, n: int,
              threads: int) -> Tensor:
    """Kernel gradient over all heads."""
    heads, rows, d = codes.shape
    tasks = _tasks(heads, steps, threads)
    grad = torch.zeros(len(tasks), heads, d)  # (tasks, H, d): each piece writes its heads' rows
    calls = []
    for k, (h0, h1, t0, t1) in enumerate(tasks):
        row = h0 * rows + t0 * n
        calls.append(functools.partial(
            lib.ov_int8_backward, codes.data_ptr() + row * d, scales.data_ptr() + 2 * row,
            prob.data_ptr() + 2 * row, g.data_ptr(), h1 - h0, rows, t1 - t0, n, d, grad[k, h0].data_ptr()))
    _run(calls, threads)
    return grad.sum(0) if len(tasks) > 1 else grad[0]


def available() -> bool:
    """Whether the native kernels compiled, loaded and passed their self-check on this machine.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _library() is not None


def _check(codes: Tensor, scales: Tensor, steps: int, n: int) -> None:
    """Raise unless the inputs have the layout the kernels read."""
    if codes.dtype != torch.int8 or codes.dim() != 3 or not codes.is_contiguous() or codes.shape[2] % 16:
        raise ValueError(f"codes must be contiguous int8 (heads, rows, d) with d a multiple of 16, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if codes.shape[2] > 128:
        raise ValueError(f"head size {codes.shape[2]} is over the kernels' 128")
    if scales.dtype != torch.float16 or not scales.is_contiguous() or scales.shape != codes.shape[:2]:
        raise ValueError(f"scales must be contiguous float16 {tuple(codes.shape[:2])}, got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    if steps * n != codes.shape[1]:
        raise ValueError(f"{codes.shape[1]} rows are not {steps} steps x {n} pixels")


def int8_forward(codes: Tensor, scales: Tensor, v: Tensor, steps: int, n: int,
                 out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Object probabilities ``sigmoid(scale_r * codes_r . v_h)`` and their sum over heads and steps.

    Args:
        codes: ``(heads, steps * n, d)`` int8 query codes, d a multiple of 16 (zero-padded).
        scales: ``(heads, steps * n)`` float16 row scales (as ``trace(query_dtype="int8")`` stores them).
        v: ``(heads, d)`` float32 scaled key differences (object minus background).
        steps: U-Net calls in the rows.
        n: pixels of the layer.
        out: a float16 ``(heads, steps * n)`` buffer to write the probabilities to (saves the page faults of a
            new allocation every epoch).

    Returns:
        ``prob`` ``(heads, steps * n)`` in float16 (kept for the gradient) and the float32 map ``(n,)``.

    Example:
        >>> codes = torch.ones(1, 2 * 16, 16, dtype=torch.int8); scales = torch.full((1, 32), 0.5).half()
        >>> if available():
        ...     prob, m = int8_forward(codes, scales, torch.zeros(1, 16), steps=2, n=16)
        ...     assert torch.allclose(m, torch.ones(16))          # sigmoid(0) = 0.5, two steps
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("opendaam's native kernels are not available here (no C compiler, no AVX-512 VNNI, "
                           "or OPENDAAM_NATIVE=0)")
    _check(codes, scales, steps, n)
    v = v.detach().float().contiguous()
    if v.shape != (codes.shape[0], codes.shape[2]):
        raise ValueError(f"v must be {(codes.shape[0], codes.shape[2])}, got {tuple(v.shape)}")
    if out is not None and (out.dtype != torch.float16 or out.shape != codes.shape[:2] or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous float16 {tuple(codes.shape[:2])} buffer")
    return _forward(lib, codes, scales, v, steps, n, torch.get_num_threads(), out)


def int8_backward(codes: Tensor, scales: Tensor, prob: Tensor, g: Tensor, steps: int, n: int) -> Tensor:
    """Gradient ``(heads, d)`` of ``sum_p g[p] * map[p]`` with respect to v, from the forward's ``prob``.

    Example:
        >>> codes = torch.ones(1, 16, 16, dtype=torch.int8); scales = torch.ones(1, 16).half()
        >>> if available():
        ...     prob, _ = int8_forward(codes, scales, torch.zeros(1, 16), steps=1, n=16)
        ...     grad = int8_backward(codes, scales, prob, torch.ones(16), steps=1, n=16)
        ...     assert torch.allclose(grad, torch.full((1, 16), 16 * 0.25))   # 16 pixels x sigmoid'(0)
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("opendaam's native kernels are not available here")
    _check(codes, scales, steps, n)
    g = g.detach().float().contiguous()
    prob = prob.contiguous()
    if g.shape != (n,) or prob.shape != codes.shape[:2] or prob.dtype != torch.float16:
        raise ValueError(f"g must be ({n},) and prob float16 {tuple(codes.shape[:2])}")
    return _backward(lib, codes, scales, prob, g, steps, n, torch.get_num_threads())
