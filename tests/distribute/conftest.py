"""Real files and the real qemu-img for the node cache and instance disk tests."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

MiB = 1 << 20


def qemu_img(*args: str | Path) -> str:
    """Run qemu-img directly (test set-up and checks only)."""
    if shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed")
    proc = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"qemu-img {args} failed: {proc.stderr}")
    return proc.stdout


def write_image(path: Path, size: int = MiB, seed: bytes = b"") -> str:
    """A fully written file of `size` bytes (pseudo-random), returning its SHA-256."""
    block = hashlib.sha256(seed or path.name.encode()).digest() * (65536 // 32)
    data = (block * (size // len(block) + 1))[:size]
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def pattern_disk(path: Path, size: int = 4 * MiB) -> bytes:
    """A raw disk with a recognisable pattern at 1 MiB and zeros elsewhere; returns its bytes."""
    data = bytearray(size)
    data[MiB : MiB + 4096] = (b"rain-pattern-" * 400)[:4096]
    data[-16:] = b"end-of-the-disk!"
    path.write_bytes(bytes(data))
    return bytes(data)


class Tick:
    """A clock that advances one second per reading, so recency is deterministic."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def clock() -> Tick:
    return Tick()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()

