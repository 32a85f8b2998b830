"""The ``sntfx`` command line, one module per stage. The CLI alone writes to the console.

Commands: ``study`` (the whole experiment), ``transform``, ``passes``,
``fold``, ``inspect``, ``train``, ``sharpness``, ``prune``, ``quantize``,
``sweep``, ``export``, ``bench``. Every command that writes a file writes it
atomically and never over one of its inputs; on bad input it prints one
paragraph saying what is wrong and how to fix it, and exits 2.

Layout: :mod:`.app` (the group, errors, console), :mod:`.options` (option
types and checks), :mod:`.console` (progress and tables), and the commands by
stage: :mod:`.expand`, :mod:`.training`, :mod:`.compression`, :mod:`.deploy`,
:mod:`.study`.
"""

from __future__ import annotations

from . import compression, deploy, expand, study, training  # noqa: F401  (each registers its commands)
from .app import cli, main
from .options import FiniteFloat

__all__ = ["main", "cli", "FiniteFloat"]
