"""Single-range `Range: bytes=...` parsing (RFC 9110 §14)."""

from __future__ import annotations

from rain.model.errors import RainError


class RangeNotSatisfiable(RainError):
    code = "range_not_satisfiable"
    status = 416


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end-exclusive), or None for the whole representation."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        raise RangeNotSatisfiable("only a single byte range per request is supported")
    first, sep, last = spec.strip().partition("-")
    try:
        if not sep:
            raise ValueError
        if first == "":
            n = int(last)
            if n <= 0:
                raise RangeNotSatisfiable(f"empty suffix range {header!r}")
            return max(size - n, 0), size
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        raise RangeNotSatisfiable(f"malformed range {header!r}") from None
    if start >= size or end <= start:
        raise RangeNotSatisfiable(f"range {header!r} is outside the {size} bytes of the image")
    return start, min(end, size)
