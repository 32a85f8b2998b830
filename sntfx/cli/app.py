"""The command group, its error handling and the console; the CLI alone writes to the console."""

from __future__ import annotations

import logging
import os
import re
import sys

import click
from rich.console import Console
from rich.logging import RichHandler

from .. import __version__
from ..errors import SntfxError

def _width(stream) -> int | None:
    """Piped into a file or a CI log, tables keep every column: 200, not rich's 80 (COLUMNS still wins)."""
    return None if stream.isatty() or os.environ.get("COLUMNS") else 200


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))


def one_paragraph(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def fail(message: str) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(one_paragraph(message))}", highlight=False, soft_wrap=True)
    sys.exit(2)


def _from_worker(message: str) -> str:
    """The message of an error raised in a DataLoader worker process (torch re-raises it with the worker's
    traceback in its text): the traceback's last line, without the exception's name."""
    if "Original Traceback" not in message:
        return message
    last = [line for line in message.splitlines() if line.strip()][-1].strip()
    return re.sub(r"^[\w.]+: ", "", last, count=1)


class SntfxGroup(click.Group):
    """The command group: every command's errors handled in one place.

    Click's usage errors (bad types, out-of-range values, missing files),
    :class:`~sntfx.errors.SntfxError` and file-system errors become one
    ``error: ...`` paragraph with exit status 2, so a command needs no error
    handling of its own. An exception sntfx did not anticipate is a bug: it
    is reported in one line with exit status 1, and ``-vv`` shows its
    traceback.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        given = args if args is not None else sys.argv[1:]  # -vv (or --verbose twice) shows tracebacks
        verbose = sum(a.count("v") if a.startswith("-v") and set(a[1:]) == {"v"} else a == "--verbose"
                      for a in given) >= 2
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            fail(exc.format_message() + hint)
        except click.exceptions.Abort:
            err_console.print("aborted")
            sys.exit(130)
        except click.exceptions.ClickException as exc:
            fail(exc.format_message())
        except SntfxError as exc:  # what the user can fix: bad input, a refused file, a missing dataset
            fail(_from_worker(str(exc)))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
            fail(f"{exc.strerror or exc}: '{exc.filename}'")
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback on the console
            from rich.markup import escape

            if verbose:
                raise
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {escape(one_paragraph(exc)[:500])}. This is a bug in "
                "sntfx; please report it with the command you ran (add -vv to see the traceback).",
                highlight=False, soft_wrap=True)
            sys.exit(1)
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=SntfxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sntfx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def cli(verbose: int) -> None:
    """sntfx: train compression-friendly vision models with SNT on torch.fx."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)], force=True
    )


def main() -> None:
    cli(prog_name="sntfx")
