"""``--json FILE``: every command that reports can write what it reported as one versioned JSON document.

The document (schema ``sntfx/schemas/command-report.schema.json``)::

    {"schema": "sntfx-command-report", "schema_version": 1, "command": "prune",
     "sntfx_version": "...", "created": "...", "argv": [...], "result": {...}}

``result`` holds what the command printed, as data (pass reports, accuracies,
paths, measurements). It is written atomically after the command succeeded;
a failed command writes nothing.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from typing import Any

import click

SCHEMA = "sntfx-command-report"
SCHEMA_VERSION = 1


def report(**fields: Any) -> None:
    """Add ``fields`` to the current command's JSON report (a no-op without ``--json``)."""
    ctx = click.get_current_context()
    ctx.meta.setdefault("sntfx_report", {}).update(fields)


def json_option(fn):
    """Add ``--json FILE`` to a command; the callback fills the report with :func:`report`."""

    @click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False),
                  help="Also write what this command reports as versioned JSON (schema sntfx-command-report).")
    @functools.wraps(fn)
    def wrapper(*args, json_path=None, **kwargs):
        from .. import __version__
        from ..io import atomic_write, check_output_path

        ctx = click.get_current_context()
        values = [v for p in ctx.params.values() for v in (p if isinstance(p, tuple) else (p,))]
        inputs = [str(v) for v in values if isinstance(v, str)]  # every path the command reads or writes
        out = check_output_path(json_path, [v for v in inputs if v != json_path], option="--json") \
            if json_path else None
        result = fn(*args, **kwargs)
        if out is not None:
            doc = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "command": ctx.info_name,
                   "sntfx_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "argv": sys.argv[1:], "result": _plain(ctx.meta.get("sntfx_report", {}))}
            text = json.dumps(doc, indent=2, allow_nan=False)
            atomic_write(out, lambda tmp: tmp.write_text(text))
        return result

    return wrapper


def _plain(value: Any) -> Any:
    """JSON-able: paths as strings, tuples as lists, non-finite floats as null."""
    import math
    from pathlib import PurePath

    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
