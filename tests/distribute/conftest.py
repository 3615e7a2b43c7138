"""Real files and the real qemu-img for the node cache and instance disk tests."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rain.store.manifest import ZERO_DIGEST, ImageManifest
from tests.conftest import Server

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



# -- an image in a real repository, with the manifest a node would get ---------------------
CHUNK = 256 * 1024


@dataclass
class RepoImage:
    """An image pushed to a real `rain serve`, and what a node needs to fetch it."""

    id: str
    path: Path  # the pushed file (the bytes every node must end up with)
    sha256: str
    manifest: ImageManifest
    url: str
    token: str


def manifest_of_file(path: Path, chunk_size: int = CHUNK) -> ImageManifest:
    """The manifest the store makes for `path`: SHA-256 per chunk, ZERO_DIGEST for zeros."""
    return manifest_of(path.read_bytes(), chunk_size)


def manifest_of(data: bytes, chunk_size: int = CHUNK) -> ImageManifest:
    chunks = []
    for off in range(0, len(data), chunk_size):
        piece = data[off : off + chunk_size]
        chunks.append(ZERO_DIGEST if piece.count(0) == len(piece)
                      else hashlib.sha256(piece).digest())
    return ImageManifest(chunk_size, len(data), hashlib.sha256(data).hexdigest(), chunks)


def mixed_image(path: Path, size: int = 8 * MiB, seed: bytes = b"rain") -> None:
    """Pseudo-random data with zero stretches (holes a transfer should skip)."""
    block = hashlib.sha256(seed).digest() * (CHUNK // 32)
    out = bytearray()
    i = 0
    while len(out) < size:
        out += bytes(CHUNK) if i % 5 == 3 else hashlib.sha256(block + bytes([i % 251])).digest() \
            * (CHUNK // 32)
        i += 1
    path.write_bytes(bytes(out[:size]))


@pytest.fixture
def repo_image(server: Server, tmp_path: Path) -> RepoImage:
    """A raw image of mixed data and zero chunks, pushed to the module's server."""
    from rain.client import Client

    path = tmp_path / "image.raw"
    mixed_image(path)
    with Client(server.url, server.token) as c:
        info = c.push(path, name=f"img-{tmp_path.name}"[:60], disk_format="raw")
    manifest = manifest_of_file(path)
    assert info["sha256"] == manifest.sha256
    return RepoImage(info["id"], path, manifest.sha256, manifest, server.url, server.token)


# -- node agents on loopback ---------------------------------------------------------------
@dataclass
class AgentProc:
    name: str
    url: str
    cache_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def key(self) -> str:
        return (self.cache_dir / "agent.key").read_text().strip()


def node_token(server: Server, name: str, verify: Any = True) -> str:
    """A node token for node `name`, issued by the server's admin."""
    import httpx

    r = httpx.post(f"{server.url}/v1/tokens", json={"node": name, "label": "test agent"},
                   headers={"Authorization": f"Bearer {server.token}"}, verify=verify,
                   timeout=30)
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


def start_agent(server: Server, name: str, root: Path, *, capacity: int = 8,
                cache_size: str = "1G", extra: tuple[str, ...] = (),
                verify: Any = True, token: str | None = None) -> AgentProc:
    """A real `rain agent` process on 127.0.0.1, registered with `server` — with its own
    node token, as operators run them, unless `token` says otherwise."""
    import time

    import httpx

    from tests.conftest import RAIN, free_port

    token = token or node_token(server, name, verify)
    port = free_port()
    cache_dir = root / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    log = cache_dir / "agent.log"
    argv = [*RAIN, "agent", "--name", name, "--repo", server.url, "--token", token,
            "--cache-dir", str(cache_dir), "--cache-size", cache_size, "--listen",
            f"127.0.0.1:{port}", "--capacity", str(capacity), "--heartbeat", "0.5", *extra]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=logf, start_new_session=True)
    agent = AgentProc(name, f"http://127.0.0.1:{port}", cache_dir, proc, log)
    deadline = time.time() + 30
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"rain agent {name} exited: {log.read_text()}")
        try:
            nodes = httpx.get(f"{server.url}/v1/nodes", timeout=2, verify=verify,
                              headers={"Authorization": f"Bearer {server.token}"}).json()
            if any(n["name"] == name and n["up"] for n in nodes["nodes"]):
                return agent
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_agent(agent)
    raise RuntimeError(f"rain agent {name} did not register: {log.read_text()}")


def stop_agent(agent: AgentProc, sig: int = 15) -> None:
    import os
    import signal

    if agent.proc.poll() is None:
        os.killpg(agent.proc.pid, sig)
        try:
            agent.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait()
