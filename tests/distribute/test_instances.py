"""Instance disks over the node cache: overlays pin their image until deleted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rain.agent import Instances, NodeCache
from rain.model import DiskFormat
from rain.model.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from tests.distribute.conftest import MiB, pattern_disk, qemu_img, sha256_of, write_image


@pytest.fixture
def cache(tmp_path: Path) -> NodeCache:
    cache = NodeCache(tmp_path / "cache", 8 * MiB)
    base = tmp_path / "base.raw"
    pattern_disk(base)  # 4 MiB
    cache.add("base", base, DiskFormat.RAW, sha256_of(base))
    return cache


def test_overlay_instance_reads_through_and_pins(tmp_path: Path, cache: NodeCache) -> None:
    instances = Instances(tmp_path / "instances", cache)
    inst = instances.create("vm-1", "base", size=6 * MiB, ephemeral_size=64 * MiB)
    assert inst.disk == tmp_path / "instances" / "vm-1" / "disk.qcow2"
    assert (inst.disk_format, inst.size, inst.copy) == (DiskFormat.QCOW2, 6 * MiB, False)
    info = json.loads(qemu_img("info", "--output=json", inst.disk))
    assert info["backing-filename"] == str(cache.root / "images" / "base.raw")
    assert info["backing-filename-format"] == "raw"
    assert inst.ephemeral is not None and inst.ephemeral.stat().st_size == 64 * MiB
    assert inst.ephemeral.stat().st_blocks == 0
    assert [e.pins for e in cache.list()] == [1]
    with pytest.raises(Conflict, match="backs 1 instance disk"):
        cache.evict("base")
    with pytest.raises(Conflict, match="already exists"):
        instances.create("vm-1", "base")
    instances.delete("vm-1")
    assert not (tmp_path / "instances" / "vm-1").exists()
    assert [e.pins for e in cache.list()] == [0]
    cache.evict("base")


def test_overlays_share_the_cached_image(tmp_path: Path, cache: NodeCache) -> None:
    """Overlays copy nothing (why they are fast: timed in benchmarks/instances.py, not here)."""
    instances = Instances(tmp_path / "instances", cache)
    image_bytes = cache.entry("base").path.stat().st_blocks * 512  # type: ignore[union-attr]
    for i in range(5):
        instances.create(f"vm-{i}", "base")
    disks = list((tmp_path / "instances").glob("vm-*/disk.qcow2"))
    assert len(disks) == 5
    assert all(d.stat().st_blocks * 512 < max(image_bytes // 4, 1024 * 1024) for d in disks)
    assert [e.pins for e in cache.list()] == [5]


def test_pinned_image_survives_cache_pressure(tmp_path: Path, cache: NodeCache) -> None:
    instances = Instances(tmp_path / "instances", cache)
    instances.create("vm-1", "base")
    big = tmp_path / "big"  # the whole cache; base is sparse and takes little, but not 0
    with pytest.raises(QuotaExceeded, match="pinned by instances: base"):
        cache.add("big", big, DiskFormat.RAW, write_image(big, 8 * MiB))
    instances.delete("vm-1")
    cache.add("big", big, DiskFormat.RAW, write_image(big, 8 * MiB))  # now base may go
    assert [e.image_id for e in cache.list()] == ["big"]


def test_copy_instance_does_not_pin(tmp_path: Path, cache: NodeCache) -> None:
    instances = Instances(tmp_path / "instances", cache)
    inst = instances.create("vm-1", "base", copy=True, size=5 * MiB)
    assert (inst.disk.name, inst.disk_format, inst.size) == ("disk.raw", DiskFormat.RAW, 5 * MiB)
    assert inst.disk.read_bytes()[: 4 * MiB] == (cache.root / "images" / "base.raw").read_bytes()
    assert [e.pins for e in cache.list()] == [0]
    cache.evict("base")
    assert inst.disk.exists()
    instances.delete("vm-1")


def test_failures_leave_nothing(tmp_path: Path, cache: NodeCache) -> None:
    instances = Instances(tmp_path / "instances", cache)
    with pytest.raises(NotFound, match="not in the node cache"):
        instances.create("vm-1", "missing")
    with pytest.raises(InvalidRequest, match="smaller than"):
        instances.create("vm-1", "base", size=MiB)
    with pytest.raises(InvalidRequest, match="instance id"):
        instances.create("../vm", "base")
    with pytest.raises(NotFound):
        instances.delete("vm-1")
    assert instances.list() == []
    assert list((tmp_path / "instances").iterdir()) == []
    assert [e.pins for e in cache.list()] == [0]


def test_restart_keeps_instances_and_their_pins(tmp_path: Path, cache: NodeCache) -> None:
    instances = Instances(tmp_path / "instances", cache)
    a = instances.create("vm-a", "base", ephemeral_size=MiB)
    instances.create("vm-b", "base", copy=True)
    (tmp_path / "instances" / ".tmp-vm-c").mkdir()  # a crash mid-create
    cache2 = NodeCache(cache.root, cache.capacity)
    again = Instances(tmp_path / "instances", cache2)
    assert [i.instance_id for i in again.list()] == ["vm-a", "vm-b"]
    assert again.get("vm-a") == a
    assert not (tmp_path / "instances" / ".tmp-vm-c").exists()
    assert [e.pins for e in cache2.list()] == [1]  # only the overlay pins
    with pytest.raises(Conflict):
        cache2.evict("base")
    again.delete("vm-a")
    cache2.evict("base")
