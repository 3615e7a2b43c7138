"""Option values checked while the command line is parsed. A value that cannot be read
(`--min-size 1Q`, `--method ftp`) is a usage error — exit 2, one line ending in the
command's `--help` — before anything is sent; what the server refuses stays exit 1.
Each checker returns the text as given: the server (or the command) reads it again."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from rain.cli.errors import cli_errors
from rain.model import BuildStatus, DiskFormat, ImageStatus, TransferMethod, Visibility
from rain.model.errors import RainError
from rain.model.units import parse_duration, parse_rate_bytes_per_second, parse_size


def _checked(parse: Callable[[str], Any]) -> Callable[[str], str]:
    def check(text: str) -> str:
        try:
            parse(text)
        except RainError as exc:
            raise cli_errors.BadParameter(exc.message) from None
        return text
    return check


def _date(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise RainError(f"bad date {text!r}: use e.g. 2025-01-31 or 2025-01-31T12:00"
                        ) from None


def choice(values: Iterable[str]) -> Callable[[str], str]:
    """One of `values`, exactly as written (the server's enums are lower case)."""
    allowed = list(values)

    def check(text: str) -> str:
        if text not in allowed:
            raise cli_errors.BadParameter(f"{text!r} is not one of {', '.join(allowed)}")
        return text
    return check


size = _checked(parse_size)
duration = _checked(parse_duration)
rate = _checked(parse_rate_bytes_per_second)
date = _checked(_date)
disk_format = choice(f.value for f in DiskFormat)
visibility = choice(v.value for v in Visibility)
image_status = choice([*(s.value for s in ImageStatus), "any"])  # any: every status
build_status = choice(s.value for s in BuildStatus)
# `cache` is what a deployment reports, not a method to ask for.
method = choice(m.value for m in TransferMethod if m is not TransferMethod.CACHE)
