"""How the `rain` command ends: every failure is one line on stderr, `rain: error: …`.

Exit status: 0 done; 1 the command failed (whatever rain, the server, a file or
the network refused); 2 the command line itself is wrong (an unknown option, a
missing argument, a value of the wrong type or one `rain.cli.values` cannot read,
options that do not go together (`WrongUsage`): click's convention, as with grep
or argparse), with a pointer to the command's `--help`; 130 interrupted.
A bug shows as one line too; `RAIN_DEBUG=1` shows its traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import typer

from rain.model.errors import RainError

try:  # newer typer carries its own copy of click
    from typer._click import exceptions as cli_errors
    from typer._click.globals import get_current_context
except ImportError:  # pragma: no cover - typer that uses click itself
    from click import exceptions as cli_errors  # type: ignore[no-redef]
    from click.globals import get_current_context  # type: ignore[no-redef]

USAGE_STATUS = 2
_INTERRUPTS: tuple[type[BaseException], ...] = (
    typer.Abort, KeyboardInterrupt, *([cli_errors.Abort] if hasattr(cli_errors, "Abort") else []))


def run(app: Any, args: Sequence[str] | None = None) -> int:
    """Run the typer app; returns the exit status, having printed any error."""
    try:
        result = app(args=args, prog_name="rain", standalone_mode=False)
    except cli_errors.NoArgsIsHelpError:
        return USAGE_STATUS  # the help text has been printed
    except cli_errors.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        return fail(_sentence(exc.format_message()).rstrip(".") + where, USAGE_STATUS)
    except cli_errors.ClickException as exc:
        return fail(_sentence(exc.format_message()), exc.exit_code)
    except _INTERRUPTS:
        sys.stderr.write("rain: interrupted\n")
        return 130
    except RainError as exc:
        return fail(exc.message)
    except OSError as exc:
        return fail(os_message(exc))
    except Exception as exc:
        if os.environ.get("RAIN_DEBUG"):
            raise
        return fail(f"unexpected {type(exc).__name__}: {exc} (a bug in rain; RAIN_DEBUG=1 "
                    "shows where)")
    return result if isinstance(result, int) else 0  # typer returns an Exit's status


class WrongUsage(cli_errors.UsageError):
    """A command line every option of which parsed, but which asks for nothing sensible
    (`deploy` with neither `--nodes` nor `--all`): exit 2 with the `--help` hint."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ctx=get_current_context(silent=True))


def fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"rain: error: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return status


def os_message(exc: OSError) -> str:
    """`PATH: reason` rather than Python's `[Errno 13] Permission denied: 'PATH'`."""
    reason = exc.strerror or str(exc)
    if exc.filename is not None:
        also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.filename}{also}: {reason}"
    return reason


def _sentence(text: str) -> str:
    """click's messages start with a capital ("No such option"); rain's do not."""
    first = text.split(" ", 1)[0]
    if first[:1].isupper() and first[1:].islower():
        return text[0].lower() + text[1:]
    return text
