"""File writing that never leaves a half-written file (write a temporary file beside it, then rename), and
an advisory lock that gives an output folder one writer at a time.

Base utility of opendaam: imports no other opendaam module, so every layer may use it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["LockError", "atomic_write_with", "folder_lock", "lock_holder", "lock_is_held", "temp_beside"]


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

    Examples:
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
    when ``write`` fails. The file gets the permissions a plain ``open(path, "w")`` would give, even when
    ``write`` replaced the temporary file with one of its own. The temporary file ends in ``suffix``, by
    default ``.tmp`` plus ``path``'s own suffix
    (for writers that choose the format by extension).

    Examples:
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
        os.chmod(tmp, _file_mode())  # writers such as safetensors' save_file replace the file: mode 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class LockError(RuntimeError):
    """Another live process holds the lock; the message names it (pid, host, since when) and the lock file."""


_HELD: dict[str, int] = {}  # lock path -> descriptor, for the locks this process holds


def lock_holder(path: str | Path) -> dict | None:
    """What a lock file says about its holder (``pid``, ``host``, ``since``, ``what``), or None when it is
    missing or unreadable.

    Examples:
        >>> import tempfile
        >>> lock_holder(Path(tempfile.mkdtemp()) / ".lock") is None
        True
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _describe_holder(path: Path) -> str:
    """``process 123 on host h (since 2026-...)`` from a lock file, or a neutral phrase."""
    info = lock_holder(path) or {}
    if "pid" not in info:
        return "another process"
    since = f", since {info['since']}" if info.get("since") else ""
    what = f", running {info['what']}" if info.get("what") else ""
    return f"process {info['pid']} on host {info.get('host', '?')}{what}{since}"


def _try_flock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; False when another open file holds it."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_fd(path: Path, tries: int = 5) -> int:
    """An open descriptor of ``path`` holding its exclusive lock; retried briefly, because
    :func:`lock_is_held` probes by locking for a moment."""
    for attempt in range(tries):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
        if not _try_flock(fd):
            os.close(fd)
            if attempt == tries - 1:
                raise LockError(f"{path.parent} is being written by {_describe_holder(path)} (lock file {path}); "
                                "wait for it to finish or stop it, then rerun")
            time.sleep(0.05)
            continue
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    raise LockError(f"could not lock {path}: it kept being replaced; rerun")


@contextlib.contextmanager
def folder_lock(path: str | Path, what: str = "opendaam") -> Iterator[Path]:
    """Hold the advisory lock file ``path`` for the duration of the block; refuse when a live process holds it.

    The lock is an ``flock`` on the file, which the kernel releases when its holder exits, however it
    exits: a lock left by a killed process is free and is taken over (its file still names the dead
    process; the new holder writes its own pid, host and start time). While held, the file names the
    holder, so the refusal says who writes the folder. The file is removed when the block ends. Locks are
    advisory: they keep opendaam processes apart, not other programs. Nested blocks on the same file in one
    process share the outer lock.

    Args:
        path: the lock file (its folder is created).
        what: a short description of the holder's work, written into the lock file.

    Raises:
        LockError: another live process holds the lock; the message names it and the lock file.

    Examples:
        >>> import tempfile
        >>> lock = Path(tempfile.mkdtemp()) / ".opendaam.lock"
        >>> with folder_lock(lock, "example"):
        ...     lock_holder(lock)["what"], lock_holder(lock)["pid"] == os.getpid()
        ('example', True)
        >>> lock.exists()
        False
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _HELD:  # re-entrant within a process: the outer block keeps and releases the lock
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(path)
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        _HELD[key] = fd
        yield path
    finally:
        _HELD.pop(key, None)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # while still locked: a waiting process then locks a fresh file (inode check above)
        os.close(fd)


def lock_is_held(path: str | Path) -> bool:
    """Whether a live process (this one included) holds the lock file ``path``.

    Examples:
        >>> import tempfile
        >>> lock = Path(tempfile.mkdtemp()) / ".lock"
        >>> with folder_lock(lock):
        ...     lock_is_held(lock)
        True
        >>> lock_is_held(lock)
        False
    """
    path = Path(path)
    if str(path.resolve()) in _HELD:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        if not _try_flock(fd):
            return True
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)
