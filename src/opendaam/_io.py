"""File writing that never leaves a half-written file: write a temporary file beside it, then rename.

Base utility of opendaam: imports no other opendaam module, so every layer may use it.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_with", "temp_beside"]


@functools.cache
def _file_mode() -> int:
    """The permissions a plain ``open(path, "w")`` would give: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def temp_beside(path: str | Path, suffix: str = ".tmp") -> str:
    """A new empty temporary file in ``path``'s folder, with the permissions a normally written file gets.

    ``tempfile.mkstemp`` creates files readable by their owner only; renamed into place, they would make
    datasets and records unreadable by other users of a shared machine.

    Example:
        >>> import tempfile
        >>> tmp = temp_beside(Path(tempfile.mkdtemp()) / "a.txt")
        >>> Path(tmp).name.startswith(".a.txt."), Path(tmp).stat().st_mode & 0o777 == _file_mode()
        (True, True)
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        os.fchmod(fd, _file_mode())
    finally:
        os.close(fd)
    return tmp


def atomic_write_with(path: str | Path, write: Callable[[Path], None], suffix: str | None = None) -> Path:
    """Call ``write(tmp)`` on a temporary file in ``path``'s folder, then rename it to ``path``.

    A crash (or ``kill -9``) leaves either the old file or the whole new one; the temporary file is removed
    when ``write`` fails. The temporary file ends in ``suffix``, by default ``.tmp`` plus ``path``'s own suffix
    (for writers that choose the format by extension).

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_with(target, lambda p: p.write_text("done")).read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(path, ".tmp" + path.suffix if suffix is None else suffix)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
