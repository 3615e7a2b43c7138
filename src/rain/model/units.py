"""Sizes, durations, rates and counts as people write them (`4G`, `30d`, `100mbit`,
`1 node`): one parser and one formatter each, shared by the API (query values), the CLI
(option values, checked before a request is sent), templates and the testbed. Sizes are
always bytes; a rate's function names its unit, because tc-style `mbit` is bits and
`MB/s` is bytes, a factor of eight apart."""

from __future__ import annotations

import math
import re
from datetime import timedelta
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from rain.model.errors import InvalidRequest

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400,
                   "w": 604800}
_SIZE_UNITS = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_BYTES_UNITS = (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))
_RATE_BITS = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?(bit|bps)?", re.IGNORECASE)
_RATE_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}
_RATE_BYTES = {"kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "b/s": 1.0}


def parse_duration(text: str) -> timedelta:
    """`30d`, `12h`, `90m`, `45s`, `2w`, `5ms`, `200us`."""
    try:
        unit = text[-2:] if text[-2:] in _DURATION_UNITS else text[-1]
        return timedelta(seconds=_amount(text[: -len(unit)]) * _DURATION_UNITS[unit])
    except (KeyError, ValueError, IndexError, OverflowError):
        raise InvalidRequest(f"bad duration {text!r}: use e.g. 30d, 12h, 90m") from None


def _amount(text: str) -> float:
    """A finite, non-negative number: `-1d`, `infG` or `nan` mean nothing here."""
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(text)
    return value


def parse_size(text: str) -> int:
    """Bytes in `4G`, `512M`, `10GiB`, `1.5T`, `1000`: binary units whatever the spelling
    (as for qemu-img: G = GiB), rounded up so a disk is never smaller than asked."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        unit = _SIZE_UNITS[t[-1]] if t and t[-1] in _SIZE_UNITS else 1
        number = Decimal(t[:-1] if unit > 1 else t)
        # 10**24 bytes is beyond any disk; bounding it keeps `1e999999999G` from
        # becoming a number too large to hold.
        if not number.is_finite() or number < 0 or number.adjusted() > 24 or (
                unit == 1 and number != int(number)):
            raise ValueError(t)
        return int((number * unit).to_integral_value(rounding=ROUND_CEILING))
    except (ValueError, InvalidOperation):
        raise InvalidRequest(f"bad size {text!r}: use e.g. 4G, 512M or a number of bytes"
                             ) from None


def format_bytes(n: float | None) -> str:
    """Binary units with one decimal, for people: `2.0 TiB`, `512 B`; `-` when unknown."""
    if n is None:
        return "-"
    if abs(n) < 1024:
        return f"{n:.0f} B"
    value = float(n) / 1024
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(value) < 1024 or unit == "EiB":
            return f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_bytes_exact(n: int) -> str:
    """A size as people write it when that loses nothing (`8G`), else `N bytes`."""
    for unit, factor in _BYTES_UNITS:
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit[0]}"
    return f"{n} bytes"


def parse_rate_bits_per_second(text: str) -> int:
    """A tc-style rate (`50mbit`, `1gbit`, `800kbit`, `1.5gbit`, `1mibit`, bare bits/s).

    `bps` forms are refused: in tc they mean *bytes* per second, a classic
    factor-of-eight mistake.
    """
    m = _RATE_BITS.fullmatch(text.strip())
    if not m or (m.group(3) or "bit").lower() != "bit":
        raise InvalidRequest(f"bad rate {text!r}: use e.g. 50mbit, 1gbit, 800kbit "
                             "or a number of bits per second")
    return int(float(m.group(1)) * _RATE_SCALE[(m.group(2) or "").lower()])


def parse_rate_bytes_per_second(text: str) -> float:
    """`100mbit`, `1gbit`, `800kbit` (bits, tc-style) or `50MB/s` (bytes) → bytes/s."""
    t = text.strip().lower().replace(" ", "")
    if t.endswith("bit"):
        try:
            return parse_rate_bits_per_second(t) / 8
        except InvalidRequest:
            pass
    for unit, mult in _RATE_BYTES.items():
        if t.endswith(unit):
            try:
                return _amount(t[: -len(unit)]) * mult
            except ValueError:
                break
    raise InvalidRequest(f"bad rate {text!r}: use e.g. 100mbit, 1gbit or 50MB/s")


def format_bits_per_second(bits: int) -> str:
    """Bits/s as tc would write them (`50mbit`), for messages and state."""
    for unit, scale in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3)):
        if bits >= scale:
            return f"{bits / scale:.6g}{unit}"
    return f"{bits}bit"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """`1 node`, `2 nodes`, `0 nodes`; `many` for nouns that do not just take an s."""
    return f"{count} {noun if count == 1 else many or noun + 's'}"
