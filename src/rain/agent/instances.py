"""Instance disks on a node: copy-on-write overlays over the node cache (seed 003).

Each instance is a directory `root/<instance id>/` holding `disk.qcow2` (an
overlay whose backing file is the cached image) or, with `copy=True`,
`disk.<fmt>` (a standalone copy, the slow baseline of seed 002 figures 1-2),
an optional sparse `ephemeral.raw`, and `instance.json`. The directory is
built under a temp name and renamed into place, so an instance either exists
whole or not at all; temp directories left by a crash are removed on start.

Every overlay pins its backing image in the `NodeCache` until it is deleted.
Pins live in memory, so on start this registry re-pins from its records: the
node agent must construct it before the cache has to evict anything. Copies
do not pin (they do not read the cached file after creation).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rain.agent.cache import TMP_PREFIX, NodeCache, check_id
from rain.formats.overlay import create_copy, create_ephemeral, create_overlay
from rain.model import DiskFormat
from rain.model.errors import Conflict, NotFound

RECORD = "instance.json"


@dataclass(frozen=True)
class Instance:
    """One instance's disks on this node."""

    instance_id: str
    image_id: str
    disk: Path
    disk_format: DiskFormat
    size: int  # virtual size of the disk
    copy: bool
    ephemeral: Path | None
    ephemeral_size: int | None
    created: float

    @property
    def pins_image(self) -> bool:
        """Whether the disk reads through to the cached image (an overlay)."""
        return not self.copy

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data["disk"] = self.disk.name
        data["ephemeral"] = None if self.ephemeral is None else self.ephemeral.name
        data["disk_format"] = str(self.disk_format)
        return data


class Instances:
    """The instance disks of one node, backed by its `NodeCache`."""

    def __init__(self, root: Path, cache: NodeCache) -> None:
        self.root = Path(root).absolute()
        self.cache = cache
        self._lock = threading.RLock()
        self._instances: dict[str, Instance] = {}
        self.root.mkdir(parents=True, exist_ok=True)
        self._load()

    def list(self) -> list[Instance]:
        """All instances, oldest first."""
        with self._lock:
            return sorted(self._instances.values(), key=lambda i: (i.created, i.instance_id))

    def get(self, instance_id: str) -> Instance | None:
        with self._lock:
            return self._instances.get(instance_id)

    def create(
        self,
        instance_id: str,
        image_id: str,
        *,
        size: int | None = None,
        copy: bool = False,
        ephemeral_size: int | None = None,
    ) -> Instance:
        """Make the disks of a new instance over cached `image_id`.

        NotFound when the image is not cached, Conflict when the id is taken,
        InvalidRequest when `size` would shrink the image.
        """
        check_id(instance_id, "instance id")
        with self._lock:
            if instance_id in self._instances:
                raise Conflict(f"instance {instance_id} already exists on this node")
            cached = self.cache.entry(image_id)
            if cached is None:
                raise NotFound(f"image {image_id} is not in the node cache")
            # Pin before touching the file so a concurrent add cannot evict it under us.
            backing = self.cache.pin(image_id)
            self.cache.get(image_id)  # a use, for the eviction policy
            tmp = self.root / f"{TMP_PREFIX}{instance_id}"
            final = self.root / instance_id
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                if copy:
                    fmt = DiskFormat.RAW if cached.format is DiskFormat.ISO else cached.format
                    name = f"disk.{fmt}"
                    vsize = create_copy(backing, cached.format, tmp / name, size=size)
                else:
                    fmt, name = DiskFormat.QCOW2, "disk.qcow2"
                    vsize = create_overlay(backing, cached.format, tmp / name, size=size)
                eph_name = None
                if ephemeral_size is not None:
                    eph_name = "ephemeral.raw"
                    create_ephemeral(tmp / eph_name, ephemeral_size)
                inst = Instance(
                    instance_id=instance_id,
                    image_id=image_id,
                    disk=final / name,
                    disk_format=fmt,
                    size=vsize,
                    copy=copy,
                    ephemeral=None if eph_name is None else final / eph_name,
                    ephemeral_size=ephemeral_size,
                    created=time.time(),
                )
                # The overlay records the backing file's absolute path, which is the
                # cache's and does not move; only the instance directory is renamed.
                (tmp / RECORD).write_text(json.dumps(inst.record(), sort_keys=True))
                os.replace(tmp, final)
            except BaseException:
                self.cache.unpin(image_id)
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if copy:
                self.cache.unpin(image_id)
            self._instances[instance_id] = inst
            return inst

    def delete(self, instance_id: str) -> None:
        """Remove an instance's disks and release its image in the cache."""
        with self._lock:
            inst = self._instances.get(instance_id)
            if inst is None:
                raise NotFound(f"instance {instance_id} does not exist on this node")
            # Rename first: a crash mid-delete leaves a temp dir that the next start removes.
            doomed = self.root / f"{TMP_PREFIX}{instance_id}.deleting"
            os.replace(self.root / instance_id, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            del self._instances[instance_id]
            if inst.pins_image:
                self.cache.unpin(inst.image_id)

    def _load(self) -> None:
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(TMP_PREFIX):
                shutil.rmtree(d, ignore_errors=True)
                continue
            rec_path = d / RECORD
            if not rec_path.is_file():
                continue
            rec = json.loads(rec_path.read_text())
            eph = rec.get("ephemeral")
            inst = Instance(
                **{
                    **rec,
                    "disk": d / rec["disk"],
                    "disk_format": DiskFormat(rec["disk_format"]),
                    "ephemeral": None if eph is None else d / eph,
                }
            )
            self._instances[inst.instance_id] = inst
            if inst.pins_image:
                # An overlay whose image left the cache (index lost by hand) stays
                # listed so it can be deleted; there is nothing to pin.
                with contextlib.suppress(NotFound):
                    self.cache.pin(inst.image_id)
