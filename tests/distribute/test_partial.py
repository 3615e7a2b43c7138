"""PartialImage: chunks verified before they count, readable while the image fills."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from rain.agent import NodeCache
from rain.distribute.partial import BadChunk, PartialImage, TransferAborted
from rain.model import DiskFormat
from rain.model.errors import InvalidRequest
from rain.store.manifest import ImageManifest
from tests.distribute.conftest import manifest_of as manifest_of_chunks

CS = 4096


def manifest_of(data: bytes) -> ImageManifest:
    return manifest_of_chunks(data, CS)


def image_bytes() -> bytes:
    # chunk 0 data, chunk 1 zeros, chunk 2 data, last chunk short
    return (b"a" * CS) + bytes(CS) + (b"b" * CS) + b"tail"


def test_put_verifies_and_zero_chunks_are_present(tmp_path: Path) -> None:
    data = image_bytes()
    m = manifest_of(data)
    with PartialImage(tmp_path / "img", m) as p:
        assert p.missing() == [0, 2, 3] and p.present(1)
        assert p.data_bytes() == 2 * CS + 4
        with pytest.raises(BadChunk, match="chunk 0 received from peer-x"):
            p.put(0, b"x" * CS, "peer-x")
        assert not p.present(0)
        with pytest.raises(BadChunk):
            p.put(3, b"tai")  # wrong length
        for i in (0, 2, 3):
            assert p.put(i, data[i * CS : (i + 1) * CS])
        assert not p.put(0, data[:CS])  # already there
        assert p.complete and p.wait_complete(0)
        assert p.read(1) == bytes(CS)
    assert (tmp_path / "img").read_bytes() == data


def test_readers_wait_for_chunks_and_see_failures(tmp_path: Path) -> None:
    data = image_bytes()
    p = PartialImage(tmp_path / "img", manifest_of(data))
    got: list[bytes] = []

    def reader() -> None:
        p.wait(2)
        got.append(p.read(2))

    t = threading.Thread(target=reader)
    t.start()
    assert not p.wait(2, timeout=0.05)
    p.put(2, data[2 * CS : 3 * CS])
    t.join(5)
    assert got == [b"b" * CS]
    p.fail(RuntimeError("source died"))
    with pytest.raises(TransferAborted, match="source died"):
        p.wait(0)
    with pytest.raises(TransferAborted):
        p.wait_complete()
    p.close()


def test_verify_file_checks_what_a_tool_wrote(tmp_path: Path) -> None:
    data = image_bytes()
    p = PartialImage(tmp_path / "img", manifest_of(data))
    damaged = bytearray(data)
    damaged[2 * CS + 7] ^= 0xFF  # chunk 2 corrupt
    damaged[CS + 5] = 9  # a zero chunk overwritten
    (tmp_path / "img").write_bytes(damaged)
    assert p.verify_file(zeros=True) == [2]
    assert p.missing() == [2]
    assert (tmp_path / "img").read_bytes()[CS : 2 * CS] == bytes(CS)
    p.put(2, data[2 * CS : 3 * CS])
    assert p.complete
    p.close()
    assert (tmp_path / "img").read_bytes() == data


def test_cache_admits_a_verified_partial_with_its_manifest(tmp_path: Path) -> None:
    data = image_bytes()
    m = manifest_of(data)
    cache = NodeCache(tmp_path / "cache", 1 << 20)
    path = cache.partial_path("img-1")
    with PartialImage(path, m) as p:
        for i in p.missing():
            p.put(i, data[i * CS : (i + 1) * CS])
    entry = cache.add("img-1", path, DiskFormat.RAW, m.sha256, move=True, manifest=m,
                      verified=True)
    assert entry.path.read_bytes() == data and not path.exists()
    assert cache.manifest("img-1") == m
    # The manifest survives a restart and goes with the image.
    again = NodeCache(tmp_path / "cache", 1 << 20)
    assert again.manifest("img-1") == m
    again.evict("img-1")
    assert again.manifest("img-1") is None
    assert list((tmp_path / "cache" / "manifests").iterdir()) == []
    # A "verified" admission needs the manifest whose digest it claims.
    other = tmp_path / "other"
    other.write_bytes(data)
    with pytest.raises(InvalidRequest):
        cache.add("img-2", other, DiskFormat.RAW, m.sha256, move=True, verified=True)
