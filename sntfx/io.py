"""File helpers: atomic writes and the never-overwrite-an-input rule.

Every file sntfx writes goes through :func:`atomic_write`: the content is
written to a temporary file in the destination folder, flushed to disk, given
the permissions an ordinary ``open(path, "w")`` would (``0o666`` less the
process umask), and renamed over the destination. A reader, or a process
killed at any moment, sees the old file or the new one, never part of one. A
full disk (or quota) becomes a :class:`~sntfx.errors.SntfxError` that names
the file and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFullError, SntfxError

__all__ = ["atomic_write", "atomic_torch_save", "check_output_path", "current_umask", "is_disk_full", "try_lock"]

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # portable fallback: read by setting, then restore at once
    os.umask(mask)
    return mask


@contextmanager
def try_lock(path: str | os.PathLike) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the ``with`` block, if no other process holds it.

    Yields True while this process holds it, or False at once when another
    one does (it never waits). The lock is advisory (``flock``): processes
    that use it exclude each other; the operating system drops it when its
    holder exits or is killed, so an interrupted process leaves no stale lock
    behind. Where there is no ``fcntl`` (Windows) it always yields True.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield True
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        yield held
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (), *,
                      option: str = "--out") -> Path:
    """Refuse an output path that is an input or whose folder does not exist (``option`` names it in messages)."""
    out = Path(out)
    for inp in inputs:
        inp = Path(inp)
        if inp.exists() and out.exists() and os.path.samefile(out, inp) or out.resolve() == inp.resolve():
            raise SntfxError(f"output '{out}' is the input file; choose another {option} path (inputs are never "
                             "overwritten)")
    if not out.parent.resolve().is_dir():
        raise SntfxError(f"output folder '{out.parent}' does not exist; create it first or choose another {option} "
                         "path")
    if out.is_dir():
        raise SntfxError(f"output '{out}' is a directory; give a file path")
    return out


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it wraps) reports a full disk, a quota or a file-size limit."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:  # torch wraps OS errors in RuntimeError
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text or "File too large" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def atomic_torch_save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`.

    torch writes to an open file object here, not to a path: its own file
    writer reports a full disk without an errno ("unexpected pos"), while
    writes through Python's file object keep the OS error.
    """
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same folder (same file system, so the
    rename is atomic) and is removed if ``write`` fails: either the whole
    file appears or nothing does. The file gets mode ``0o666 & ~umask``,
    like any file the user creates.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(f"cannot write '{path}': no space left on its device; free some space or "
                                "choose another output location") from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc):
            raise DiskFullError(f"cannot write '{path}': no space left on its device (or over a quota or file-size "
                                "limit); nothing was written. Free some space or choose another output location"
                                ) from exc
        raise
    return path
