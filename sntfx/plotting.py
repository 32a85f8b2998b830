"""PNG plots: matplotlib without a display, figures written atomically."""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write

__all__ = ["pyplot", "save_png"]


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed; imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as PNG, atomically (honouring the umask), and close it."""
    try:
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        pyplot().close(fig)
    return Path(path)
