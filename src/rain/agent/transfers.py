"""Images on their way to this node: one `Transfer` per image, run in its own thread.

A transfer fetches the manifest, fills a PartialImage with the deployment's
method, and admits the result into the node cache (no second hash: every
chunk was verified). If the method fails — a dead tree parent, a swarm that
stalls, a multicast stream that never came — the agent falls back to the
repository for whatever is still missing, so a node only fails when the
repository itself cannot give it the image. A second request for an image
already on its way joins the running transfer.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rain.agent.cache import NodeCache, check_id
from rain.distribute.methods.base import FetchContext, LocalChunks, NodeMethod, node_method
from rain.distribute.partial import PartialImage
from rain.distribute.source import RepoSource, TransferStats
from rain.model import DiskFormat, InvalidImage, InvalidRequest, RainError
from rain.model.deploy import DeployOptions

log = logging.getLogger("rain.agent")

FETCHING, DONE, FAILED, CANCELLED = "fetching", "done", "failed", "cancelled"


@dataclass
class FetchRequest:
    """What `POST /v1/fetch` asks for."""

    image_id: str
    sha256: str
    disk_format: DiskFormat
    method: str
    plan: dict[str, Any] = field(default_factory=dict)
    deployment: str = ""
    peer_token: str = ""
    options: DeployOptions = field(default_factory=DeployOptions)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> FetchRequest:
        try:
            image_id = check_id(str(body["image_id"]))
            sha256 = str(body["sha256"]).lower()
            fmt = DiskFormat(str(body.get("disk_format") or "raw"))
            method = str(body.get("method") or "http")
        except KeyError as exc:
            raise InvalidRequest(f"fetch request lacks {exc.args[0]!r}") from None
        except ValueError as exc:
            raise InvalidRequest(f"bad fetch request: {exc}") from None
        plan = body.get("plan") or {}
        if not isinstance(plan, dict):
            raise InvalidRequest("fetch request: plan must be an object")
        options = DeployOptions.from_json(body.get("options"))
        return cls(image_id, sha256, fmt, method, plan, str(body.get("deployment") or ""),
                   str(body.get("peer_token") or ""), options)


@dataclass
class Transfer:
    request: FetchRequest
    method: NodeMethod
    stats: TransferStats = field(default_factory=TransferStats)
    state: str = FETCHING
    error: str | None = None
    fallback: str | None = None  # why the repository had to finish it, if it did
    started: float = field(default_factory=time.time)
    finished: float | None = None
    partial: PartialImage | None = None
    ctx: FetchContext | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def status(self) -> dict[str, Any]:
        p = self.partial
        return {
            "image_id": self.request.image_id, "state": self.state, "error": self.error,
            "method": self.request.method, "deployment": self.request.deployment,
            "fallback": self.fallback, "started": self.started, "finished": self.finished,
            "chunks_missing": p.missing_count if p is not None else None,
            "stats": self.stats.to_dict(),
        }

    def set_state(self, state: str, error: str | None = None) -> None:
        with self.changed:
            self.state, self.error = state, error
            self.finished = time.time()
            self.changed.notify_all()

    def wait(self, timeout: float) -> None:
        with self.changed:
            self.changed.wait_for(lambda: self.state != FETCHING, timeout)


class Transfers:
    """Every transfer this agent runs or ran, by image id."""

    def __init__(self, cache: NodeCache, node: str, host: str, repo_url: str, token: str,
                 work_dir: Path, *, local: LocalChunks | None = None,
                 on_cached: Any = None, context: Any = None) -> None:
        self.cache = cache
        self.node = node
        self.host = host
        self.repo_url = repo_url
        self.token = token
        self.work_dir = work_dir
        self.local = local
        self.on_cached = on_cached  # called with (image_id, path) after admission
        self.context = context  # ssl.SSLContext for an https repository
        self._lock = threading.Lock()
        self._transfers: dict[str, Transfer] = {}
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True, exist_ok=True)

    def get(self, image_id: str) -> Transfer | None:
        with self._lock:
            return self._transfers.get(image_id)

    def in_flight(self) -> list[str]:
        with self._lock:
            return [i for i, t in self._transfers.items() if t.state == FETCHING]

    def partial(self, image_id: str) -> PartialImage | None:
        t = self.get(image_id)
        return None if t is None else t.partial

    def start(self, req: FetchRequest) -> Transfer:
        """Start fetching `req.image_id`, or join the transfer already running for it."""
        method = node_method(req.method)  # InvalidRequest for an unknown one
        with self._lock:
            current = self._transfers.get(req.image_id)
            if current is not None and current.state == FETCHING:
                return current
            t = Transfer(req, method)
            self._transfers[req.image_id] = t
            if current is not None:
                self._close(current)
        threading.Thread(target=self._run, args=(t,), name=f"fetch-{req.image_id[:8]}",
                         daemon=True).start()
        return t

    def release(self, image_id: str) -> Transfer | None:
        """Cancel a running transfer, or stop serving a finished one to peers."""
        t = self.get(image_id)
        if t is None:
            return None
        t.cancel.set()
        with contextlib.suppress(Exception):
            t.method.release(image_id)
        if t.state != FETCHING:
            with self._lock:
                if self._transfers.get(image_id) is t:
                    del self._transfers[image_id]
            self._close(t)
        return t

    def close(self) -> None:
        with self._lock:
            transfers = list(self._transfers.values())
        for t in transfers:
            self.release(t.request.image_id)

    # -- the transfer itself ----------------------------------------------------
    def _run(self, t: Transfer) -> None:
        req = t.request
        workdir = self.work_dir / req.image_id
        src = RepoSource(self.repo_url, self.token, deployment=req.deployment,
                         context=self.context, max_rate=req.options.max_rate_bytes_per_s)
        try:
            manifest = src.manifest(req.image_id)
            if manifest.sha256 != req.sha256:
                raise InvalidImage(f"image {req.image_id}: the repository's manifest is for "
                                   f"sha256 {manifest.sha256}, the deployment asked for "
                                   f"{req.sha256}")
            workdir.mkdir(parents=True, exist_ok=True)
            partial = PartialImage(self.cache.partial_path(req.image_id), manifest)
            t.partial = partial
            ctx = FetchContext(
                node=self.node, image_id=req.image_id, sha256=req.sha256,
                disk_format=req.disk_format, manifest=manifest, partial=partial, repo=src,
                plan=req.plan, stats=t.stats, cancel=t.cancel, workdir=workdir,
                peer_token=req.peer_token, host=self.host, local=self.local,
                log=lambda msg: log.info("%s %s: %s", self.node, req.image_id[:8], msg),
                options=req.options)
            t.ctx = ctx
            try:
                t.method.fetch(ctx)
            except Exception as exc:
                if t.cancel.is_set():
                    raise
                # The method could not finish (bad peers, a stalled swarm, no stream):
                # what is missing comes from the repository.
                t.fallback = f"{type(exc).__name__}: {exc}"
                log.warning("%s: %s for %s failed (%s); fetching the rest from the repository",
                            self.node, req.method, req.image_id, exc)
                src.fetch(req.image_id, partial, stats=t.stats, cancel=t.cancel)
            if not partial.complete:
                src.fetch(req.image_id, partial, stats=t.stats, cancel=t.cancel)
            partial.sync()
            entry = self.cache.add(req.image_id, partial.path, req.disk_format, req.sha256,
                                   move=True, manifest=manifest, verified=True)
            with contextlib.suppress(Exception):
                t.method.cached(ctx, entry.path)
            if self.on_cached is not None:
                self.on_cached(req.image_id, entry.path)
            t.set_state(DONE)
        except BaseException as exc:
            if t.partial is not None:
                t.partial.fail(exc)
            message = exc.message if isinstance(exc, RainError) else f"{type(exc).__name__}: {exc}"
            t.set_state(CANCELLED if t.cancel.is_set() else FAILED, message)
            log.warning("%s: transfer of %s %s: %s", self.node, req.image_id, t.state, message)
            with contextlib.suppress(FileNotFoundError):
                self.cache.partial_path(req.image_id).unlink()
        finally:
            src.close()
            shutil.rmtree(workdir, ignore_errors=True)

    def _close(self, t: Transfer) -> None:
        if t.partial is not None:
            t.partial.close()
