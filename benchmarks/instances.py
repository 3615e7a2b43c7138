"""Instance disk from the node cache: qcow2 overlay vs full copy (issue 4, seed 002 figs 1-2).

Puts one image of `--size` virtual bytes holding `--data` bytes of random data
(spread over the disk in 4 MiB extents, zeros elsewhere, sparse) into a
`rain.agent.NodeCache`, then times `Instances.create` for `--runs`
overlays and `--runs` full copies (`copy=True`, `qemu-img convert`, zeros
skipped), each followed by `delete`. Copies are timed as the call returns
(data may still be in the page cache) and again including an fsync of the new
disk, which is what a node really pays before the disk is safe. Medians, and
the copy/overlay ratio, are printed for a raw and a qcow2 cached image.

    .venv/bin/python benchmarks/instances.py            # 1 GiB image, 256 MiB data
    .venv/bin/python benchmarks/instances.py --size 4G --data 1G --runs 5
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import MiB, human, parse_size

from rain.agent import Instances, NodeCache
from rain.formats import convert_file
from rain.model import DiskFormat

EXTENT = 4 * MiB


def make_raw(path: Path, size: int, data: int, seed: int) -> None:
    """A sparse raw disk of `size` bytes with `data` random bytes in evenly spread extents."""
    rng = random.Random(seed)
    extents = max(1, data // EXTENT)
    stride = size // extents
    with path.open("wb") as f:
        f.truncate(size)
        for i in range(extents):
            f.seek(i * stride)
            f.write(rng.randbytes(EXTENT))
        f.flush()
        os.fsync(f.fileno())


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(instances: Instances, image_id: str, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"overlay": [], "copy": [], "copy+fsync": []}
    for i in range(runs):
        t0 = time.perf_counter()
        instances.create(f"ov-{i}", image_id)
        times["overlay"].append(time.perf_counter() - t0)
        instances.delete(f"ov-{i}")
    for i in range(runs):
        t0 = time.perf_counter()
        inst = instances.create(f"cp-{i}", image_id, copy=True)
        t1 = time.perf_counter()
        fsync_file(inst.disk)
        t2 = time.perf_counter()
        times["copy"].append(t1 - t0)
        times["copy+fsync"].append(t2 - t0)
        instances.delete(f"cp-{i}")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G", help="virtual size of the image (default 1G)")
    ap.add_argument("--data", default="256M", help="random data in it (default 256M)")
    ap.add_argument("--runs", type=int, default=7, help="timed creations of each kind")
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/rain-bench/instances"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    args = ap.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    work: Path = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"# instance disks: {human(size)} image, {human(data)} data, {args.runs} runs, "
          f"{platform.node()} ({os.cpu_count()} CPUs), work dir {work}")
    try:
        raw = work / "image.raw"
        make_raw(raw, size, data, args.seed)
        qcow = work / "image.qcow2"
        convert_file(raw, DiskFormat.RAW, qcow, DiskFormat.QCOW2)
        cache = NodeCache(work / "cache", 4 * size)
        for image_id, src, fmt in (("img-raw", raw, DiskFormat.RAW),
                                   ("img-qcow2", qcow, DiskFormat.QCOW2)):
            cache.add(image_id, src, fmt, sha256_of(src), move=True)
        instances = Instances(work / "instances", cache)
        print(f"{'cached image':<14} {'overlay ms':>11} {'copy ms':>9} {'copy+fsync ms':>14} "
              f"{'ratio':>7} {'ratio+fsync':>12}")
        for image_id in ("img-raw", "img-qcow2"):
            t = measure(instances, image_id, args.runs)
            med = {k: statistics.median(v) * 1000 for k, v in t.items()}
            label = image_id.removeprefix("img-")
            print(f"{label:<14} {med['overlay']:>11.1f} {med['copy']:>9.1f} "
                  f"{med['copy+fsync']:>14.1f} {med['copy'] / med['overlay']:>6.0f}x "
                  f"{med['copy+fsync'] / med['overlay']:>11.0f}x")
            print(f"{'':<14} overlay min/max {min(t['overlay']) * 1000:.1f}/"
                  f"{max(t['overlay']) * 1000:.1f} ms; copy min/max "
                  f"{min(t['copy']) * 1000:.1f}/{max(t['copy']) * 1000:.1f} ms")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
