"""File helpers: atomic writes and the never-overwrite-an-input rule."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import SntfxError

__all__ = ["atomic_write", "check_output_path"]


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output path that is an input or whose folder does not exist."""
    out = Path(out)
    for inp in inputs:
        inp = Path(inp)
        if inp.exists() and out.exists() and os.path.samefile(out, inp) or out.resolve() == inp.resolve():
            raise SntfxError(f"output '{out}' is the input file; choose another --out path (inputs are never overwritten)")
    if not out.parent.resolve().is_dir():
        raise SntfxError(f"output folder '{out.parent}' does not exist; create it first or choose another --out path")
    if out.is_dir():
        raise SntfxError(f"output '{out}' is a directory; give a file path")
    return out


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``.

    The temporary file lives in the same folder (same file system, so the
    rename is atomic) and is removed if ``write`` fails: either the whole
    file appears or nothing does.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path
