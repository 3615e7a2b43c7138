"""The one parser and formatter for each unit people write (rain.model.units)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rain.model.errors import InvalidRequest
from rain.model.units import (
    format_bits_per_second,
    format_bytes,
    format_bytes_exact,
    parse_duration,
    parse_rate_bits_per_second,
    parse_rate_bytes_per_second,
    parse_size,
)

GIB = 1024**3
TIB = 1024**4


@pytest.mark.parametrize(("text", "expected"), [
    ("4G", 4 * GIB), ("512M", 512 * 1024**2), ("10GiB", 10 * GIB), ("1.5g", 3 * GIB // 2),
    ("2T", 2 * TIB), ("1073741824", GIB), ("4 GB", 4 * GIB), ("64k", 65536), ("0", 0),
    ("0.1K", 103),  # rounded up: a disk is never smaller than asked
])
def test_sizes_are_bytes_in_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["four", "4X", "-4G", "", "G", "1.5", "nanG", "infG",
                                  "1e999999999G", "4 G B"])
def test_bad_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(InvalidRequest, match="bad size") as info:
        parse_size(text)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [
    ("30d", timedelta(days=30)), ("12h", timedelta(hours=12)), ("90m", timedelta(minutes=90)),
    ("45s", timedelta(seconds=45)), ("2w", timedelta(weeks=2)),
    ("5ms", timedelta(milliseconds=5)), ("200us", timedelta(microseconds=200)),
])
def test_durations(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "30", "d", "-1d", "infd", "5x", "5mm"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidRequest, match="bad duration"):
        parse_duration(text)


def test_tc_rates_are_bits_and_bytes_rates_are_bytes() -> None:
    assert parse_rate_bits_per_second("100mbit") == 100_000_000
    assert parse_rate_bytes_per_second("100mbit") == 12_500_000  # the factor of eight
    assert parse_rate_bytes_per_second("50MB/s") == 50_000_000
    assert parse_rate_bytes_per_second("1 gbit") == 125_000_000
    assert parse_rate_bits_per_second("1mibit") == 1 << 20


@pytest.mark.parametrize("text", ["50mbps", "fast", "5mbit/s", "-5mbit", "mbit"])
def test_bits_rates_refuse_bytes_spellings(text: str) -> None:
    with pytest.raises(InvalidRequest, match="bad rate"):
        parse_rate_bits_per_second(text)


@pytest.mark.parametrize("text", ["100", "50mbps", "fast", "-5MB/s", "infMB/s", "MB/s"])
def test_bytes_rates_need_a_unit(text: str) -> None:
    with pytest.raises(InvalidRequest, match="bad rate"):
        parse_rate_bytes_per_second(text)


@pytest.mark.parametrize(("n", "text"), [
    (512, "512 B"), (1536, "1.5 KiB"), (2 * TIB, "2.0 TiB"), ((1 << 64) - 1, "16.0 EiB"),
    (None, "-"),
])
def test_format_bytes(n: int | None, text: str) -> None:
    assert format_bytes(n) == text


def test_exact_sizes_read_back() -> None:
    assert format_bytes_exact(8 * GIB) == "8G"
    assert format_bytes_exact(1536) == "1536 bytes"  # 1.5K would not read back
    assert parse_size(format_bytes_exact(3 * TIB)) == 3 * TIB
    assert format_bytes_exact(1000) == "1000 bytes"


def test_bit_rates_format_back() -> None:
    assert format_bits_per_second(50_000_000) == "50mbit"
    assert format_bits_per_second(800_000) == "800kbit"
    assert format_bits_per_second(999) == "999bit"
    assert parse_rate_bits_per_second(format_bits_per_second(1_500_000_000)) == 1_500_000_000
