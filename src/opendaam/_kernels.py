"""Native kernels for open-vocabulary token optimization on int8 query caches, compiled at first use.

``assets/kernels/ov_int8.c`` (C with AVX-512 VNNI and AMX intrinsics, and a portable AVX2 path) is compiled
once per machine and source version with the system's C compiler (``$CC``, else ``cc`` or ``gcc``) into
``$OPENDAAM_CACHE`` (default ``~/.cache/opendaam``), loaded with :mod:`ctypes` and checked against a float64
reference before first use. ``-march=native`` picks the AVX-512 path where the CPU has AVX-512 VNNI, else
the AVX2 one (x86-64-v3: AVX2, FMA, F16C); both compute the same integers and the same floats, bit for bit.
``OPENDAAM_NATIVE=avx2`` forces the AVX2 path; without a compiler, on another CPU or with
``OPENDAAM_NATIVE=0``, :func:`available` is ``False`` and callers use torch. ctypes releases the GIL during a
call, so ranges of pixels run in parallel threads when torch is allowed more than one.
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
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from opendaam._io import temp_beside

__all__ = ["ISAS", "Packed", "amx", "available", "int8_map", "int8_maps", "isa", "jac_grads", "pack", "pad16"]

_FLAGS = ["-O3", "-fPIC", "-shared"]
ISAS = ("avx512", "avx2")  # the kernel's paths: AVX-512 VNNI (+ AMX tiles where granted), and portable AVX2
_ARCH = {  # compiler flags per build: the CPU's own (its best path), or x86-64-v3 for the AVX2 path anywhere
    "native": ["-march=native"],
    "avx2": ["-march=x86-64-v3", "-mtune=native"],
}


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


def _compile(source: Path, arch: list[str]) -> Path | None:
    """The shared library of ``source`` built with ``arch`` flags, compiled now unless cached; ``None`` if it
    fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    flags = [*_FLAGS, *arch]
    key = hashlib.sha256(b"\0".join([source.read_bytes(), version.encode(), " ".join(flags).encode(),
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
    tmp = temp_beside(target)
    try:
        done = subprocess.run([compiler, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            return None
        os.replace(tmp, target)  # atomic: a concurrent process sees the old state or the whole library
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _library(isa: str | None = None) -> ctypes.CDLL | None:
    """The kernel library of path ``isa`` (None: this machine's best, or what ``OPENDAAM_NATIVE`` says), or
    ``None`` when it cannot be used here."""
    if isa is None:
        setting = os.environ.get("OPENDAAM_NATIVE", "1").lower()
        if setting in ("0", "false", "no", "off"):
            return None
        isa = "avx2" if setting == "avx2" else None
    elif isa not in ISAS:
        raise ValueError(f"unknown kernel path {isa!r}; choose from {', '.join(ISAS)}")
    if isa == "avx2":
        return _load("avx2")
    lib = _load("native")
    if isa == "avx512" and lib is not None and lib.ov_isa() != 512:
        return None
    return lib


@functools.cache
def _load(build: str) -> ctypes.CDLL | None:
    """The loaded and self-checked library of one build (see ``_ARCH``), or ``None``."""
    with resources.as_file(resources.files("opendaam") / "assets" / "kernels" / "ov_int8.c") as source:
        path = _compile(Path(source), _ARCH[build])
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError:
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    lib.ov_int8_map.argtypes = [pointer, pointer, pointer, *[size] * 8, pointer, pointer, ctypes.c_float, size]
    lib.ov_jac_vm.argtypes = [pointer, pointer, size, size, size, pointer]
    lib.ov_int8_map.restype = lib.ov_int8_amx.restype = lib.ov_jac_vm.restype = lib.ov_isa.restype = ctypes.c_int
    if not _self_check(lib):
        warnings.warn("opendaam's native int8 kernels disagree with the float reference on this machine; "
                      "using torch instead", RuntimeWarning, stacklevel=2)
        return None
    return lib


def _reference(codes: Tensor, scales: Tensor, v: Tensor, steps: int, n: int) -> tuple[Tensor, Tensor]:
    """Map and Jacobian in float64 (what the kernel computes) from codes ``(heads, steps * n, d)``."""
    heads, _, d = codes.shape
    s = torch.einsum("hrd,hd->hr", codes.double(), v.double()) * scales.double()  # (H, R)
    prob = torch.sigmoid(s).view(heads, steps, n)
    weight = prob * (1 - prob) * scales.double().view(heads, steps, n)  # (H, S, N)
    jac = torch.einsum("hsn,hsnd->nhd", weight, codes.double().view(heads, steps, n, d))  # (N, H, d)
    return prob.sum((0, 1)), jac


def _self_check(lib: ctypes.CDLL) -> bool:
    """Whether the library matches :func:`_reference` on small problems of several shapes and tails."""
    gen = torch.Generator().manual_seed(0)
    for heads, steps, n, d in ((2, 3, 16, 16), (3, 2, 5, 48), (1, 4, 100, 64), (2, 1, 37, 80), (1, 2, 16, 128),
                               (1, 67, 20, 32)):
        codes = torch.randint(-127, 128, (heads, steps * n, d), generator=gen, dtype=torch.int8)
        scales = (torch.rand(heads, steps * n, generator=gen) * 0.02).half()
        v = torch.randn(heads, d, generator=gen)
        want_map, want_jac = _reference(codes, scales, v, steps, n)
        g = torch.randn(n, generator=gen)
        want_grad = torch.einsum("n,nhd->hd", g.double(), want_jac)
        packed = pack(codes, scales, steps, n)
        for amx in (True, False):
            (got_map,), (jac,) = _maps(lib, [packed], [v], threads=2, amx=amx)
            got_jac = jac[..., :d].double() * packed.jac_unit
            (got_grad,) = _jac_grads(lib, [packed], [jac], [g], threads=2)
            if not (torch.allclose(got_map.double(), want_map, rtol=1e-4, atol=1e-4 * float(want_map.abs().max()))
                    and torch.allclose(got_jac, want_jac, atol=1e-3 * float(want_jac.abs().max()))
                    and torch.allclose(got_grad[:, :d].double(), want_grad,
                                       atol=1e-3 * float(want_grad.abs().max()))):
                return False
    return True


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """A persistent thread pool of ``threads`` workers (a pool per call costs more than small layers)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="opendaam-kernel")


def _block_ranges(blocks: int, threads: int) -> list[tuple[int, int]]:
    """Up to ``threads`` ranges of 16-pixel blocks covering ``range(blocks)``: each call writes its own pixels
    of the map and the Jacobian, so the pieces need no reduction."""
    parts = max(1, min(threads, blocks))
    bounds = [blocks * i // parts for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _dispatch(per_thread: list[list], threads: int) -> None:
    """Run each thread's list of kernel calls, the lists in parallel on the pool; raise if a call failed."""
    tasks = [calls for calls in per_thread if calls]

    def run(calls) -> list[int]:
        return [call() for call in calls]

    if len(tasks) > 1:
        codes = [c for done in _pool(threads).map(run, tasks) for c in done]
    else:
        codes = run(tasks[0]) if tasks else []
    if any(code != 0 for code in codes):
        raise RuntimeError(f"native kernel failed with codes {codes}")


def _maps(lib, packed: list[Packed], vs: list[Tensor], threads: int, jacs: list[Tensor] | None = None,
          amx: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Kernel maps and Jacobians of several layers (into ``jacs`` when given; products on AMX tiles where the
    CPU and OS allow and ``amx``): thread ``t`` computes the ``t``-th range of pixel blocks of every layer,
    so the threads meet once for all layers."""
    maps, out_jacs, padded, per_thread = [], [], [], [[] for _ in range(threads)]
    for i, (p, v) in enumerate(zip(packed, vs, strict=True)):
        heads, blocks, steps, _, d = p.codes.shape
        v = pad16(v.detach().float()).contiguous()  # (H, d16)
        padded.append(v)  # alive until the calls have run
        out = torch.zeros(p.n)  # (N,)
        jac = (torch.empty(p.n, heads, d, dtype=torch.float16) if jacs is None
               else jacs[i])  # (N, H, d16) in units of p.jac_unit: every entry is written
        maps.append(out)
        out_jacs.append(jac)
        for t, (a, b) in enumerate(_block_ranges(blocks, threads)):
            per_thread[t].append(functools.partial(
                lib.ov_int8_map, p.codes.data_ptr(), p.scales.data_ptr(), v.data_ptr(), 0, heads, heads, steps,
                p.n, d, a, b, out.data_ptr(), jac.data_ptr(), p.jac_unit, int(amx)))
    _dispatch(per_thread, threads)
    return maps, out_jacs


def _jac_grads(lib, packed: list[Packed], jacs: list[Tensor], gs: list[Tensor], threads: int) -> list[Tensor]:
    """``g @ jac`` of several layers, ``(heads, d16)`` each, in one dispatch: each thread sums its range of
    pixels of every layer, the threads' partial sums are added at the end."""
    cols = [j.shape[1] * j.shape[2] for j in jacs]
    offsets = [sum(cols[:i]) for i in range(len(cols))]
    parts = torch.empty(threads, sum(cols))  # (threads, all columns), every entry written by its thread
    gs = [g.detach().float().contiguous() for g in gs]
    per_thread = [[] for _ in range(threads)]
    for jac, g, c, o in zip(jacs, gs, cols, offsets, strict=True):
        ranges = _block_ranges(jac.shape[0], threads)  # ranges of rows here
        for t in range(threads):
            r0, r1 = ranges[t] if t < len(ranges) else (0, 0)  # an empty range writes zeros
            per_thread[t].append(functools.partial(lib.ov_jac_vm, jac.data_ptr(), g.data_ptr(), r0, r1, c,
                                                   parts[t].data_ptr() + 4 * o))
    _dispatch(per_thread, threads)  # every thread has a call per layer: each writes its row of parts
    total = parts.sum(0) if threads > 1 else parts[0]
    return [total[o : o + c].view(j.shape[1], j.shape[2]) * p.jac_unit
            for p, j, c, o in zip(packed, jacs, cols, offsets, strict=True)]


def amx() -> bool:
    """Whether the kernel runs its products on AMX tiles here (CPU with AMX-INT8, granted by the OS).

    Examples:
        >>> isinstance(amx(), bool)
        True
    """
    lib = _library()
    return bool(lib is not None and lib.ov_int8_amx())


def available(isa: str | None = None) -> bool:
    """Whether the native kernels (of path ``isa``, one of :data:`ISAS`; None: the default one) compiled,
    loaded and passed their self-check on this machine.

    Examples:
        >>> isinstance(available(), bool), isinstance(available("avx2"), bool)
        (True, True)
    """
    return _library(isa) is not None


def isa() -> str | None:
    """The path the kernels run by default here: ``"avx512"`` (VNNI, AMX tiles where :func:`amx`),
    ``"avx2"``, or None (not available: callers use torch).

    Examples:
        >>> isa() in (*ISAS, None)
        True
    """
    lib = _library()
    return None if lib is None else ("avx512" if lib.ov_isa() == 512 else "avx2")


def pad16(t: Tensor) -> Tensor:
    """``t`` zero-padded in its last dimension to a multiple of 16 (the kernels' and int8 matmuls' unit).

    Examples:
        >>> tuple(pad16(torch.ones(2, 40)).shape)
        (2, 48)
    """
    extra = -t.shape[-1] % 16
    return torch.nn.functional.pad(t, (0, extra)) if extra else t


@dataclass(frozen=True)
class Packed:
    """One layer's int8 query codes in the kernel's layout (see :func:`pack`)."""

    codes: Tensor  # (heads, blocks, steps, 16, d16) int8, zero rows past the last pixel, zero columns past d
    scales: Tensor  # (heads, blocks, steps, 16) float16
    n: int  # pixels of the layer
    head_dim: int  # d before padding
    jac_unit: float  # the float16 Jacobian's unit: its largest possible entry (steps * 127 * max scale / 4) / 2^15


def _check_packed(p: Packed) -> None:
    """Raise unless ``p`` has the layout the kernel reads (its strides come from ``n`` and the shapes)."""
    c, s = p.codes, p.scales
    ok = (c.dtype == torch.int8 and c.dim() == 5 and c.is_contiguous() and c.shape[3] == 16
          and c.shape[4] % 16 == 0 and 16 <= c.shape[4] <= 128 and c.shape[1] == -(-p.n // 16)
          and s.dtype == torch.float16 and s.is_contiguous() and tuple(s.shape) == tuple(c.shape[:4]))
    if not ok:
        raise ValueError(f"not a packed layer of {p.n} pixels: codes {c.dtype} {tuple(c.shape)}, scales "
                         f"{s.dtype} {tuple(s.shape)}; build it with pack()")


def pack(codes: Tensor, scales: Tensor, steps: int, n: int) -> Packed:
    """Lay out one layer's int8 codes for :func:`int8_map`: blocks of 16 pixels whose rows of all steps are
    contiguous (the kernel streams one block at a time), head size zero-padded to a multiple of 16.

    Args:
        codes: ``(heads, steps * n, d)`` int8 query codes, rows ordered (step, pixel), d at most 128.
        scales: ``(heads, steps * n)`` row scales (as ``trace(query_dtype="int8")`` stores them), stored
            as float16.
        steps: U-Net calls in the rows.
        n: pixels of the layer.

    Examples:
        >>> p = pack(torch.ones(2, 3 * 20, 40, dtype=torch.int8), torch.ones(2, 60).half(), steps=3, n=20)
        >>> tuple(p.codes.shape), tuple(p.scales.shape)
        ((2, 2, 3, 16, 48), (2, 2, 3, 16))
    """
    if codes.dtype != torch.int8 or codes.dim() != 3:
        raise ValueError(f"codes must be int8 (heads, rows, d), got {codes.dtype} {tuple(codes.shape)}")
    heads, rows, d = codes.shape
    if d > 128:
        raise ValueError(f"head size {d} is over the kernels' 128")
    if steps * n != rows:
        raise ValueError(f"{rows} rows are not {steps} steps x {n} pixels")
    if scales.shape != codes.shape[:2]:
        raise ValueError(f"scales must be {tuple(codes.shape[:2])}, got {tuple(scales.shape)}")
    blocks, extra = -(-n // 16), -n % 16
    c = torch.nn.functional.pad(pad16(codes).view(heads, steps, n, -1), (0, 0, 0, extra))  # (H, S, 16 B, d16)
    c = c.view(heads, steps, blocks, 16, -1).transpose(1, 2).contiguous()  # (H, B, S, 16, d16)
    sc = torch.nn.functional.pad(scales.half().view(heads, steps, n), (0, extra))  # (H, S, 16 B)
    sc = sc.view(heads, steps, blocks, 16).transpose(1, 2).contiguous()  # (H, B, S, 16)
    top = float(scales.float().abs().max()) if scales.numel() else 0.0
    unit = steps * 127 * top / 4 / 2**15 or 1.0  # sigmoid' <= 1/4: every entry is within 2^15 units
    return Packed(codes=c, scales=sc, n=n, head_dim=d, jac_unit=unit)


def int8_map(packed: Packed, v: Tensor, jac: Tensor | None = None, amx: bool = True,
             isa: str | None = None) -> tuple[Tensor, Tensor]:
    """Object map ``sum over heads and steps of sigmoid(scale_r * codes_r . v_h)`` and its Jacobian in v.

    Args:
        packed: one layer's codes and scales from :func:`pack`.
        v: ``(heads, d)`` scaled key differences (object minus background), d the head size (or padded).
        jac: a float16 ``(n, heads, d16)`` buffer to write the Jacobian to (saves the page faults of a new
            allocation every epoch).
        amx: run the products on AMX tiles where :func:`amx` says they can (the same integers as the
            AVX-512 path; ``False`` forces that path).
        isa: the kernel path, one of :data:`ISAS` (None: the default, see :func:`isa`); the results are the
            same bit for bit.

    Returns:
        The float32 map ``(n,)`` and its Jacobian ``d map[p] / d v[h]`` as float16 ``(n, heads, d16)`` in
        units of ``packed.jac_unit`` (columns past the head size are zero): the gradient of a loss with
        ``g = d loss / d map`` is :func:`jac_grads` (``g @ jac`` times the unit).

    Examples:
        >>> p = pack(torch.ones(1, 2 * 16, 16, dtype=torch.int8), torch.full((1, 32), 0.5), steps=2, n=16)
        >>> if available():
        ...     m, jac = int8_map(p, torch.zeros(1, 16))
        ...     assert torch.allclose(m, torch.ones(16))                               # 2 steps x sigmoid(0)
        ...     want = torch.full((16, 1, 16), 2 * 0.25 * 0.5)                          # x sigmoid'(0) x scale
        ...     assert torch.allclose(jac.float() * p.jac_unit, want, rtol=1e-3)  # float16 storage
    """
    maps, jacs = int8_maps([packed], [v], None if jac is None else [jac], amx, isa)
    return maps[0], jacs[0]


def int8_maps(packed: list[Packed], vs: list[Tensor], jacs: list[Tensor] | None = None,
              amx: bool = True, isa: str | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """:func:`int8_map` of several layers in one dispatch of the kernel threads (each thread takes its share
    of every layer, so they meet once, not once per layer).

    Examples:
        >>> p = pack(torch.ones(1, 16, 16, dtype=torch.int8), torch.ones(1, 16), steps=1, n=16)
        >>> if available():
        ...     (m1, m2), _ = int8_maps([p, p], [torch.zeros(1, 16), torch.zeros(1, 16)])
        ...     assert torch.equal(m1, m2) and torch.allclose(m1, torch.full((16,), 0.5))
    """
    lib = _library(isa)
    if lib is None:
        raise RuntimeError(f"opendaam's native kernels{'' if isa is None else ' (' + isa + ')'} are not available "
                           "here (no C compiler, a CPU without AVX2/FMA/F16C or, for avx512, without AVX-512 "
                           "VNNI, or OPENDAAM_NATIVE=0)")
    if len(vs) != len(packed) or (jacs is not None and len(jacs) != len(packed)):
        raise ValueError(f"{len(packed)} layers need as many vectors (got {len(vs)}) and Jacobian buffers")
    for i, (p, v) in enumerate(zip(packed, vs, strict=True)):
        _check_packed(p)
        heads, _, _, _, d = p.codes.shape
        if v.dim() != 2 or v.shape[0] != heads or v.shape[1] not in (p.head_dim, d):
            raise ValueError(f"v must be ({heads}, {p.head_dim}), got {tuple(v.shape)}")
        shape = (p.n, heads, d)
        jac = None if jacs is None else jacs[i]
        if jac is not None and (jac.dtype != torch.float16 or jac.shape != shape or not jac.is_contiguous()):
            raise ValueError(f"jac must be a contiguous float16 {shape} buffer")
    return _maps(lib, packed, vs, torch.get_num_threads(), jacs, amx)


def jac_grads(packed: list[Packed], jacs: list[Tensor], gs: list[Tensor], isa: str | None = None) -> list[Tensor]:
    """Gradients ``(heads, d16)`` in the layers' vectors of a loss with ``gs[l] = d loss / d map_l``, from the
    Jacobians :func:`int8_maps` returned, in one dispatch of the kernel threads.

    Examples:
        >>> p = pack(torch.ones(1, 16, 16, dtype=torch.int8), torch.ones(1, 16), steps=1, n=16)
        >>> if available():
        ...     _, (jac,) = int8_maps([p], [torch.zeros(1, 16)])
        ...     (grad,) = jac_grads([p], [jac], [torch.ones(16)])
        ...     assert torch.allclose(grad, torch.full((1, 16), 16 * 0.25), rtol=1e-3)  # 16 x sigmoid'(0)
    """
    lib = _library(isa)
    if lib is None:
        raise RuntimeError("opendaam's native kernels are not available here")
    for p, jac, g in zip(packed, jacs, gs, strict=True):
        if jac.dtype != torch.float16 or not jac.is_contiguous() or jac.shape[0] != p.n or jac.shape[2] % 16:
            raise ValueError(f"jac must be a contiguous float16 ({p.n}, heads, d16) Jacobian from int8_maps")
        if g.shape != (p.n,):
            raise ValueError(f"g must be ({p.n},), got {tuple(g.shape)}")
    return _jac_grads(lib, packed, jacs, gs, torch.get_num_threads())
