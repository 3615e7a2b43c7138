"""What a transfer method is: a node side that fills a PartialImage, and a
coordinator side (in the repository server) that plans and feeds the nodes.

A deployment runs like this (rain.deploy.coordinator):

1. The coordinator builds a `DeploymentJob` for the nodes that lack the
   image and calls `CoordinatorMethod.prepare(job)`, which returns one plan
   (a JSON-able dict) per node and starts whatever the repository itself must
   run for the method (a udp-sender, a BitTorrent seed, a tracker entry).
2. Every node's agent receives its plan (`POST /v1/fetch`), fetches the
   manifest, creates a PartialImage and calls `NodeMethod.fetch(ctx)`, which
   returns once every chunk is present and verified — or raises.
3. The coordinator waits for all nodes, then calls `finish(job)` and asks
   `repo_bytes(job)` for what the repository sent outside its HTTP file
   endpoint (the server counts those itself).

Every method (`rain.distribute.methods.<name>.method`) defines two objects,
`NODE` and `COORDINATOR`; `node_method`/`coordinator_method` import them by
name, so libtorrent is only imported where BitTorrent is used.
"""

from __future__ import annotations

import importlib
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from rain.distribute.partial import PartialImage
from rain.distribute.source import RepoSource, TransferStats
from rain.model import DiskFormat, InvalidRequest
from rain.model.deploy import DeployOptions
from rain.store.manifest import ImageManifest

if TYPE_CHECKING:
    from rain.model import Image, NodeState
    from rain.store.stream import ImageReader

METHODS = ("http", "tree", "multicast", "bittorrent", "chunks")


class LocalChunks(Protocol):
    """Chunks this node already holds, by digest (its cached images and other transfers)."""

    def find(self, digest: bytes) -> tuple[Path, int] | None:
        """(file, offset) of a verified chunk with this digest, or None."""
        ...


@dataclass
class FetchContext:
    """Everything the node side of a method needs for one image."""

    node: str  # this node's name
    image_id: str
    sha256: str
    disk_format: DiskFormat
    manifest: ImageManifest
    partial: PartialImage  # where verified chunks go; readable while it fills
    repo: RepoSource  # the repository, as this agent's user, tagged with the deployment
    plan: dict[str, Any]  # this node's part of the method's plan
    stats: TransferStats
    cancel: threading.Event
    workdir: Path  # scratch space for this transfer (removed afterwards)
    peer_token: str  # bearer token other nodes of the deployment accept, and send
    host: str = ""  # this node's own address (where its agent listens)
    local: LocalChunks | None = None
    log: Callable[[str], None] = print
    options: DeployOptions = field(default_factory=DeployOptions)  # the deployment's


class NodeMethod(Protocol):
    name: ClassVar[str]

    def fetch(self, ctx: FetchContext) -> None:
        """Return when `ctx.partial` is complete; raise when it cannot be."""
        ...

    def cached(self, ctx: FetchContext, path: Path) -> None:
        """The image is now in the node cache at `path` (the partial file was renamed there):
        keep serving it to peers from there (e.g. re-seed) until `release`."""
        ...

    def release(self, image_id: str) -> None:
        """The deployment is over (or was cancelled): stop serving `image_id` to peers."""
        ...


class ImageRepository(Protocol):
    """What the repository halves of the methods use of the repository server's
    `rain.repo.Repository`, named here so that no method imports the repository, its
    database or its chunk store."""

    def manifest_id_of(self, image_id: str) -> str | None:
        """The id of the manifest the image's bytes are stored under (None: no data)."""
        ...

    def load_manifest(self, manifest_id: str) -> ImageManifest: ...

    def chunk_reader(self, manifest: ImageManifest, image_id: str = "") -> ImageReader:
        """Reads the chunks `manifest` lists (in its order), each verified."""
        ...

    def torrent_of(self, image_id: str) -> tuple[str, int, bytes] | None:
        """(info hash, piece size, bencoded torrent) of the image, or None."""
        ...

    def save_torrent(self, image_id: str, info_hash: str, piece_size: int,
                      data: bytes) -> None: ...


class NodeDirectory(Protocol):
    """The registered nodes, as the `chunks` method's repository half looks for holders
    (rain.deploy.nodes.NodeRegistry)."""

    def node_states(self) -> list[NodeState]: ...

    def agent_endpoint(self, name: str) -> tuple[str, str]:
        """(address, agent key) to call node `name`'s agent with."""
        ...


@dataclass
class RepoSide:
    """The repository server's side of distribution, shared by all deployments."""

    repo: ImageRepository
    config: Any  # rain.deploy.config.DistributeConfig
    host: str  # the address the server listens on: nodes reach the repository there
    port: int
    data_dir: Path  # scratch and seed files live under it
    # How the repository verifies agents that serve HTTPS (None: the system CAs).
    agent_context: ssl.SSLContext | None = None
    # The registered nodes (set by the coordinator, which keeps them).
    nodes: NodeDirectory | None = None
    # Long-lived helpers a method keeps between deployments (e.g. the BitTorrent seeder),
    # by name; create them under `lock`.
    services: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class NodeTarget:
    """A node a deployment sends the image to, as the coordinator reaches it."""

    name: str
    address: str  # the agent's base URL
    key: str  # bearer token the agent accepts from the repository

    @property
    def host(self) -> str:
        from urllib.parse import urlsplit

        return urlsplit(self.address).hostname or ""


@dataclass
class DeploymentJob:
    """One deployment's transfer, as the coordinator side of a method sees it."""

    id: str
    image: Image
    manifest: ImageManifest
    manifest_id: str
    nodes: list[NodeTarget]  # the nodes that need the image
    peer_token: str
    options: DeployOptions
    seed_file: Callable[[], Path]  # the image as a file on the repository (made on first call)
    workdir: Path  # scratch space on the repository for this deployment
    server: RepoSide
    log: Callable[[str], None] = print
    state: dict[str, Any] = field(default_factory=dict)  # the method's own bookkeeping


class CoordinatorMethod(Protocol):
    name: ClassVar[str]

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        """Per-node plans (by node name); start what the repository side runs."""
        ...

    def finish(self, job: DeploymentJob) -> None:
        """Stop what `prepare` started (called once, also after failures)."""
        ...

    def repo_bytes(self, job: DeploymentJob) -> int:
        """Bytes the repository sent for this job other than through its HTTP file endpoint."""
        ...


def _module(name: str) -> Any:
    if name not in METHODS:
        raise InvalidRequest(f"unknown transfer method {name!r}: use one of "
                             f"{', '.join(('auto', *METHODS))}")
    return importlib.import_module(f"rain.distribute.methods.{name}.method")


def node_method(name: str) -> NodeMethod:
    method: NodeMethod = _module(name).NODE
    return method


def coordinator_method(name: str) -> CoordinatorMethod:
    method: CoordinatorMethod = _module(name).COORDINATOR
    return method
