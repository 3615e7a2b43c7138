"""Small real disk images for tests, and their digests."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

MiB = 1024 * 1024


def make_raw(path: Path, size: int = 8 * MiB, seed: int = 1, data_fraction: float = 0.25) -> Path:
    """A raw disk image: random data in the first part, zeros after it."""
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(int(size * data_fraction)))
        f.truncate(size)
    return path


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(MiB):
            h.update(b)
    return h.hexdigest()
