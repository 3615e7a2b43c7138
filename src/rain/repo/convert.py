"""Converted variants: `pull --format qcow2` converts once, stores the result
(cheap: it dedups against everything else) and serves it again next time."""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path

from rain.catalog import Catalog, Variant
from rain.formats import CONVERT_LIMITS, convert_file
from rain.model import DiskFormat, Image, InvalidRequest
from rain.store import ChunkStore, ImageManifest, ImageReader, ImageWriter

OUTPUT_FORMATS = {DiskFormat.RAW, DiskFormat.QCOW2, DiskFormat.VMDK, DiskFormat.VHDX,
                  DiskFormat.VDI, DiskFormat.VPC}
_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


def materialize(store: ChunkStore, manifest: ImageManifest, path: Path, image_id: str) -> None:
    """Write the image to a sparse file (zero chunks become holes)."""
    reader = ImageReader(store, manifest, image=image_id)
    with open(path, "wb") as f:
        for block in reader.iter_range():
            if block.count(0) != len(block):
                f.write(block)
            else:
                f.seek(len(block), os.SEEK_CUR)
        f.truncate(manifest.size)


def store_file(store: ChunkStore, path: Path) -> tuple[ImageManifest, str, int]:
    writer = ImageWriter(store)
    try:
        with open(path, "rb") as f:
            while block := f.read(4 * 1024 * 1024):
                writer.write(block)
                writer.wait()
    except BaseException:
        writer.abort()  # gives its buffers and its share of the budget back
        raise
    manifest = writer.finish()
    return manifest, store.put_manifest(manifest), writer.stored_bytes


def variant_for(catalog: Catalog, store: ChunkStore, image: Image, manifest_id: str,
                fmt: DiskFormat, work_dir: Path) -> Variant:
    if fmt not in OUTPUT_FORMATS:
        raise InvalidRequest(f"cannot convert to {fmt}; choose one of "
                             f"{', '.join(sorted(str(f) for f in OUTPUT_FORMATS))}")
    with _locks_guard:
        lock = _locks.setdefault((image.id, str(fmt)), threading.Lock())
    with lock:  # two pulls of a new variant convert once
        existing = catalog.get_variant(image.id, fmt)
        if existing is not None:
            return existing
        assert image.disk_format is not None
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=work_dir, prefix="convert-") as tmp:
            src = Path(tmp) / "source"
            dst = Path(tmp) / f"out.{fmt}"
            materialize(store, store.get_manifest(manifest_id), src, image.id)
            src_fmt = DiskFormat.RAW if image.disk_format == DiskFormat.ISO else image.disk_format
            convert_file(src, src_fmt, dst, fmt, CONVERT_LIMITS)
            manifest, mid, stored = store_file(store, dst)
        variant = Variant(fmt, mid, manifest.sha256, manifest.size, stored)
        catalog.put_variant(image.id, variant)
        return variant
