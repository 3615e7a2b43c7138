"""Sizes, durations, rates and counts as people write them (`4G`, `30d`, `100mbit`,
`1 node`): one parser each, shared by the API (query values) and the CLI (option values,
checked before a request is sent), and one way to count things in messages."""

from __future__ import annotations

import math
from datetime import timedelta

from rain.model.errors import InvalidRequest


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w`."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    try:
        return timedelta(seconds=_amount(text[:-1]) * units[text[-1]])
    except (KeyError, ValueError, IndexError, OverflowError):
        raise InvalidRequest(f"bad duration {text!r}: use e.g. 30d, 12h, 90m") from None


def _amount(text: str) -> float:
    """A finite, non-negative number: `-1d`, `infG` or `nan` mean nothing here."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def parse_size(text: str) -> int:
    """`4G`, `512M`, `1.5T`, `1000` (bytes); binary units."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(_amount(t[:-1]) * units[t[-1]])
        value = int(t)
        if value < 0:
            raise ValueError(t)
        return value
    except (ValueError, OverflowError):
        raise InvalidRequest(f"bad size {text!r}: use e.g. 4G, 512M or a number of bytes") from None


def parse_rate(text: str) -> float:
    """`100mbit`, `1gbit`, `800kbit` (bits/s) or `50MB/s` style bytes → bytes per second."""
    t = text.strip().lower().replace(" ", "")
    bits = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bit": 1.0}
    for unit, mult in bits.items():
        if t.endswith(unit):
            try:
                return _amount(t[: -len(unit)]) * mult / 8
            except ValueError:
                break
    per = {"kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "b/s": 1.0}
    for unit, mult in per.items():
        if t.endswith(unit):
            try:
                return _amount(t[: -len(unit)]) * mult
            except ValueError:
                break
    raise InvalidRequest(f"bad rate {text!r}: use e.g. 100mbit, 1gbit or 50MB/s")


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 node`, `2 nodes`, `0 nodes`; `many` for nouns that do not just take an s."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
