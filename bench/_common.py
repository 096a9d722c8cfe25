"""Small helpers shared by the benchmarks: the CPU's name, peak memory per device, device sync, JSON output."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

__all__ = ["cpu_model", "peak_memory_mb", "reset_peak_memory", "sync", "write_json"]


def cpu_model() -> str:
    """The ``model name`` line of /proc/cpuinfo (the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def reset_peak_memory(device: str = "cpu") -> None:
    """Reset the peak-memory mark: CUDA's allocator statistics, or the kernel's VmHWM of this process."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_mb(device: str = "cpu") -> float:
    """Peak memory in MiB since the last reset: CUDA max allocated, else the process's peak RSS (VmHWM)."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    """Wait for queued accelerator work, so wall times cover it."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and a rename (never a truncated file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def add_run(path: str | os.PathLike, name: str, data: Any) -> Path:
    """Store ``data`` as run ``name`` of a benchmark's one results file (``{"runs": {name: ...}}``), keeping the
    file's earlier runs: one file per benchmark in bench/results."""
    path = Path(path)
    stored = json.loads(path.read_text()) if path.exists() else {"benchmark": path.stem, "runs": {}}
    stored.setdefault("runs", {})[name] = data
    return write_json(path, stored)
