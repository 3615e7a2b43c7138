"""Fixed-size vs content-defined chunking, measured on a realistic image family.

Builds a sparse raw base image (ext4 made by `mke2fs -d` over ~1/4 of its size of
files) and derived images changed in place by `debugfs -w` (see images.py), then
ingests base + derived into a fresh `rain.store` per setting and reports stored
bytes, chunk counts and base-image ingest throughput:

* fixed-size chunking through `rain.store.ImageWriter` (what the repository does),
  at several chunk sizes, and with zstd for the chosen size;
* content-defined chunking (FastCDC, the `fastcdc` package's Cython scanner) into
  the same `ChunkStore` (same zero-chunk skipping, same digests, same object layout);
* the same for qcow2 conversions of every image, since users push qcow2.

Usage:  .venv/bin/python benchmarks/chunking.py [--size 2G] [--markdown] [--keep]
Needs:  mke2fs, debugfs, qemu-img; `pip install fastcdc` for the CDC rows.
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import (
    ImageSet,
    KiB,
    MiB,
    build_image_set,
    changed_blocks,
    disk_usage,
    ensure_qcow2,
    human,
    machine_info,
    parse_size,
    read_through,
    table,
)

from rain.store import ChunkStore, FilesystemBackend, ImageWriter, StoreConfig

FEED = 1 * MiB  # the server feeds the writer 1 MiB blocks too


@dataclass
class Result:
    method: str  # "fixed" | "cdc" | "ideal"
    chunk: int  # chunk size, or CDC average
    fmt: str  # "raw" | "qcow2"
    compress: bool
    base_stored: int
    total_stored: int
    chunks: int  # chunk objects in the store
    disk: int  # allocated bytes of the store directory (du)
    base_seconds: float
    base_input: int  # bytes read for the base (file size)

    @property
    def label(self) -> str:
        if self.method == "ideal":
            return "ideal: changed 4 KiB blocks"
        name = f"fixed {human(self.chunk)}" if self.method == "fixed" else \
            f"CDC avg {human(self.chunk)}"
        return f"{name}{' +zstd' if self.compress else ''}"


# -- ingest -------------------------------------------------------------------------------

def ingest_fixed(store: ChunkStore, path: Path) -> int:
    """One image through ImageWriter exactly as the server streams it; returns bytes added."""
    writer = ImageWriter(store)
    with open(path, "rb", buffering=0) as f:
        while block := f.read(FEED):
            writer.write(block)
            writer.wait()
    manifest = writer.finish()
    store.put_manifest(manifest)
    return writer.stored_bytes


def ingest_cdc(store: ChunkStore, path: Path, avg: int, pool: ThreadPoolExecutor) -> int:
    """One image cut by FastCDC (min avg/4, max 4·avg) into the same store; returns bytes added.

    Mirrors ImageWriter: whole-image SHA-256 in one ordered thread, chunk digests and
    writes in a pool, all-zero chunks not stored, bounded in-flight work, one
    commit (pack fdatasync + index transaction) at the end.
    """
    from fastcdc import fastcdc

    lo, hi = max(avg // 4, 64), avg * 4
    zeros = bytes(hi)
    whole = hashlib.sha256()
    hasher = ThreadPoolExecutor(max_workers=1)
    pending: deque[Future[int]] = deque()
    hashing: deque[Future[None]] = deque()
    added = 0

    def put(data: bytes) -> int:
        return store.put_chunk(hashlib.sha256(data).digest(), data)

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        for c in fastcdc(mm, min_size=lo, avg_size=avg, max_size=hi):
            data = mm[c.offset : c.offset + c.length]
            hashing.append(hasher.submit(whole.update, data))
            if not (data[:64] == zeros[: min(64, len(data))] and data == zeros[: len(data)]):
                pending.append(pool.submit(put, data))
            while len(pending) > 16:
                added += pending.popleft().result()
            while len(hashing) > 64:
                hashing.popleft().result()
    for fut in pending:
        added += fut.result()
    for h in hashing:
        h.result()
    hasher.shutdown()
    store.flush()  # commit the shared pack: durable and indexed
    return added


def measure(images: list[Path], workdir: Path, method: str, chunk: int, fmt: str,
            compress: bool, pool: ThreadPoolExecutor) -> Result:
    """Ingest all images into a fresh store; base first (timed), then the derived ones."""
    root = workdir / f"store-{method}-{chunk}-{fmt}{'-z' if compress else ''}"
    if root.exists():
        shutil.rmtree(root)
    cfg = StoreConfig(chunk_size=chunk if method == "fixed" else 256 * KiB, compress=compress)
    store = ChunkStore(FilesystemBackend(root), cfg)
    ingest: Callable[[Path], int]
    if method == "fixed":
        def ingest(p: Path) -> int:
            return ingest_fixed(store, p)
    else:
        def ingest(p: Path) -> int:
            return ingest_cdc(store, p, chunk, pool)
    t0 = time.perf_counter()
    base_stored = ingest(images[0])
    base_seconds = time.perf_counter() - t0
    total = base_stored + sum(ingest(p) for p in images[1:])
    chunks = sum(1 for _ in store.list_chunks())
    _apparent, allocated = disk_usage(root)
    shutil.rmtree(root)
    return Result(method, chunk, fmt, compress, base_stored, total, chunks, allocated,
                  base_seconds, images[0].stat().st_size)


def ideal(imgs: ImageSet) -> Result:
    """Lower bound at 4 KiB (ext4 block) granularity: non-zero blocks of the base + changes."""
    base = 0
    zero_block = bytes(4 * KiB)
    with open(imgs.base, "rb") as f:
        while block := f.read(4 * MiB):
            if block.count(0) != len(block):
                base += sum(1 for o in range(0, len(block), 4 * KiB)
                            if block[o : o + 4 * KiB] != zero_block) * 4 * KiB
    changed = sum(changed_blocks(imgs.base, d) for d in imgs.derived)
    return Result("ideal", 4 * KiB, "raw", False, base, base + changed, 0, 0, 0.0, 0)


# -- reporting -----------------------------------------------------------------------------

def headers(n_images: int) -> list[str]:
    return ["setting", "format", "base stored", f"{n_images} images stored", "÷ base stored",
            "÷ one image", "added per derived", "chunk objects", "store on disk (du)",
            "base ingest MB/s"]


def row(r: Result, logical: int, n_derived: int) -> list[str]:
    mbps = f"{r.base_input / r.base_seconds / 1e6:.0f}" if r.base_seconds else "–"
    per = (r.total_stored - r.base_stored) / max(n_derived, 1)
    return [r.label, r.fmt, human(r.base_stored), human(r.total_stored),
            f"{r.total_stored / r.base_stored:.3f}", f"{r.total_stored / logical:.3f}",
            human(per), f"{r.chunks:,}" if r.chunks else "–",
            human(r.disk) if r.disk else "–", mbps]


def choose_fixed(results: list[Result], slack: float = 0.10) -> int:
    """The largest fixed size whose raw total is within `slack` of the best fixed size.

    Bigger chunks mean fewer objects, smaller manifests and faster I/O; stop growing
    once the dedup loss is noticeable.
    """
    fixed = [r for r in results if r.method == "fixed" and r.fmt == "raw" and not r.compress]
    best = min(r.total_stored for r in fixed)
    return max(r.chunk for r in fixed if r.total_stored <= best * (1 + slack))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="logical size of each image (default 2G)")
    ap.add_argument("--derived", type=int, default=9, help="derived images (default 9)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/rain-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (images are reused)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--sizes", default="64K,128K,256K,1M,4M",
                    help="fixed chunk sizes, comma separated")
    ap.add_argument("--cdc-avg", default="64K,256K", help="FastCDC average sizes ('' = none)")
    ap.add_argument("--compress-size", default="auto",
                    help="fixed size to repeat with zstd ('auto' = chosen size)")
    ap.add_argument("--no-qcow2", action="store_true")
    args = ap.parse_args(argv)

    size = parse_size(args.size)
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    cdc_avgs = [parse_size(s) for s in args.cdc_avg.split(",") if s]
    if cdc_avgs:
        try:
            import fastcdc  # noqa: F401
        except ImportError:
            print("fastcdc is not installed (.venv/bin/pip install fastcdc): no CDC rows",
                  file=sys.stderr)
            cdc_avgs = []
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cdc")
    results: list[Result] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    try:
        imgs = build_image_set(work, size, args.derived, args.seed)
        for p in imgs.all:
            read_through(p)  # page cache warm: measure chunking, not the first disk read

        def run(method: str, chunk: int, fmt: str, files: list[Path], z: bool = False) -> None:
            t0 = time.perf_counter()
            r = measure(files, work, method, chunk, fmt, z, pool)
            results.append(r)
            print(f"  {r.label:<22} {fmt:<5} total {human(r.total_stored):>11}  "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)

        print("measuring (raw):", flush=True)
        results.append(ideal(imgs))
        for cs in sizes:
            run("fixed", cs, "raw", imgs.all)
        for avg in cdc_avgs:
            run("cdc", avg, "raw", imgs.all)
        chosen = choose_fixed(results) if args.compress_size == "auto" else \
            parse_size(args.compress_size)
        run("fixed", chosen, "raw", imgs.all, z=True)
        if not args.no_qcow2:
            qcow = ensure_qcow2(imgs)
            for p in qcow:
                read_through(p)
            print("measuring (qcow2):", flush=True)
            for cs in (64 * KiB, 256 * KiB):
                run("fixed", cs, "qcow2", qcow)
            for avg in cdc_avgs:
                run("cdc", avg, "qcow2", qcow)

        rows = [row(r, size, args.derived) for r in results]
        print()
        print(f"{1 + args.derived} images of {human(size)} (ext4, {human(imgs.data_bytes)} of "
              f"files; derived: {human(sum(imgs.written) / max(len(imgs.written), 1))} written "
              f"each by debugfs)")
        print(table(headers(1 + args.derived), rows))
        print(f"\nchosen fixed size: {human(chosen)} (largest within 10 % of the best fixed "
              f"total on raw)")
        if args.markdown:
            m = machine_info()
            print("\n## Chunking benchmark\n")
            print(f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['kernel']}, "
                  f"Python {m['python']}")
            print(f"- date: {started}")
            print(f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`")
            print(f"- images: 1 base + {args.derived} derived, {human(size)} each, ext4 with "
                  f"{human(imgs.data_bytes)} of files; ÷ one image = total / {human(size)}\n")
            print(table(headers(1 + args.derived), rows, markdown=True))
            print(f"\nChosen fixed chunk size: **{human(chosen)}**.")
    finally:
        pool.shutdown(cancel_futures=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
