"""The repository's side of a deployment: tell the nodes what to fetch and how, wait,
make the instance disks, and write down what it cost.

`Coordinator.deploy` records the deployment and returns at once; a thread per
deployment (`DeploymentRun`) does the work:

1. Nodes that cache the image already need no transfer. For the others the
   method is chosen (rain.deploy.auto) and its coordinator side
   prepares a plan per node (and starts what the repository runs for it).
2. Every node is told in parallel (`POST /v1/fetch` with its plan) and
   followed until its copy is verified in its cache; then its instance
   disks are made (one request per node). A node that fails or dies is
   written down as such; the others go on.
3. The report: makespan and first-ready (seconds from the request),
   ready time per node, bytes the repository sent (its HTTP file endpoint
   counts per deployment, plus what the method sent otherwise) and bytes
   the nodes sent each other.

The peer token of a deployment lets its nodes read from each other, and its
image from the repository (`?access_token=`, for BitTorrent web seeds),
while the deployment runs.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from rain.catalog import Catalog
from rain.deploy.auto import choose_method
from rain.deploy.config import check_distribute
from rain.deploy.nodes import NodeRegistry
from rain.deploy.records import DeploymentRecords
from rain.deploy.seeds import SeedFiles
from rain.distribute.agentclient import AgentClient
from rain.distribute.methods.base import DeploymentJob, NodeTarget, RepoSide, coordinator_method
from rain.model import (
    Deployment,
    DeploymentStatus,
    Image,
    InstanceStatus,
    NodeState,
    Placement,
    RainError,
    TransferMethod,
    User,
)
from rain.model.clock import utcnow
from rain.model.deploy import DeployOptions
from rain.repo import Repository
from rain.store.manifest import ZERO_DIGEST, ImageManifest

log = logging.getLogger("rain.deploy")
POLL_SECONDS = 1.0
SAVE_SECONDS = 1.0


@dataclass
class NodeProgress:
    """One node's part of a deployment, as the report shows it."""

    name: str
    count: int  # instances to make there
    needs_image: bool
    state: str = "waiting"  # waiting | fetching | creating | ready | failed
    source: str = ""
    progress: float = 0.0
    fetched_s: float | None = None
    ready_s: float | None = None
    instances: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    fallback: str | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state, "source": self.source, "progress": round(self.progress, 4),
                "fetched_s": _r(self.fetched_s), "ready_s": _r(self.ready_s),
                "count": self.count, "instances": list(self.instances),
                "repo_bytes": int(self.stats.get("repo_bytes", 0)),
                "peer_bytes": int(self.stats.get("peer_bytes", 0)),
                "local_bytes": int(self.stats.get("local_bytes", 0)),
                "sent_bytes": int(self.stats.get("sent_bytes", 0)),
                "bad_chunks": int(self.stats.get("bad_chunks", 0)),
                "dropped": list(self.stats.get("dropped", [])),
                "fallback": self.fallback, "error": self.error}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Coordinator:
    """Runs deployments for one repository server."""

    def __init__(self, repo: Repository, side: RepoSide, catalog: Catalog) -> None:
        check_distribute(side.config)
        self.repo = repo  # side.repo, with what the coordinator records beyond the methods
        # Nodes and deployments live in the repository's database (`catalog`, handed over
        # by the server that opened it), but are this side's.
        self.nodes = NodeRegistry(catalog, repo.config)
        self.records = DeploymentRecords(catalog)
        self.side = side
        side.nodes = self.nodes
        self.seeds = SeedFiles(side.data_dir / "seeds", side.config.seed_dir_bytes)
        self.work = side.data_dir / "deployments"
        ca = getattr(side.config, "agent_ca", "")
        self.agent_context = ssl.create_default_context(cafile=ca) if ca else None
        side.agent_context = self.agent_context
        shutil.rmtree(self.work, ignore_errors=True)
        self._lock = threading.Lock()
        self._runs: dict[str, DeploymentRun] = {}
        self._bytes: dict[str, int] = {}
        self._tokens: dict[str, tuple[str, str, User]] = {}  # token → (deployment, image, user)

    # -- what the HTTP layer asks -------------------------------------------------------
    def deploy(self, viewer: User, image: Image, *, placements: list[Placement],
               targets: list[str], method: str, options: DeployOptions, prefetch: bool = False,
               started: float | None = None,
               placement: dict[str, Any] | None = None) -> Deployment:
        """Record the deployment and start it; `targets` are all nodes that must hold the
        image (those in `placements` get instances too); `placement` (how they were
        placed: rain.schedule.describe) goes into the report."""
        started = time.monotonic() if started is None else started
        counts = {p.node: p.count for p in placements}
        names = list(dict.fromkeys([*counts, *targets]))
        dep = self.records.new_deployment(
            viewer, image, method=method, count=sum(counts.values()), nodes=names,
            options=options.to_json(), prefetch=prefetch)
        run = DeploymentRun(self, dep, viewer, image, counts, names, method, options, started)
        run.placement = placement
        with self._lock:
            self._runs[dep.id] = run
            self._tokens[run.peer_token] = (dep.id, image.id, viewer)
        threading.Thread(target=run.run, name=f"deploy-{dep.id[:8]}", daemon=True).start()
        return dep

    def running(self) -> list[DeploymentRun]:
        with self._lock:
            return list(self._runs.values())

    def in_flight(self) -> dict[str, set[str]]:
        """Images on their way to each node right now (for the cache weigher)."""
        out: dict[str, set[str]] = {}
        for run in self.running():
            for name in run.fetching():
                out.setdefault(name, set()).add(run.image.id)
        return out

    def cancel(self, deployment_id: str) -> bool:
        with self._lock:
            run = self._runs.get(deployment_id)
        if run is None:
            return False
        run.cancel.set()
        return True

    def wait(self, deployment_id: str, timeout: float | None = None) -> bool:
        with self._lock:
            run = self._runs.get(deployment_id)
        return True if run is None else run.done.wait(timeout)

    def viewer_for_token(self, token: str, image_id: str) -> User | None:
        """The deployment's owner, when `token` is the peer token of a running deployment
        of `image_id` (the only thing such a token lets anyone read)."""
        with self._lock:
            entry = self._tokens.get(token)
        if entry is None or entry[1] != image_id:
            return None
        return entry[2]

    def count_bytes(self, deployment_id: str, n: int) -> None:
        """Bytes the HTTP file endpoint sent for a deployment (X-Rain-Deployment)."""
        with self._lock:
            if deployment_id in self._runs:
                self._bytes[deployment_id] = self._bytes.get(deployment_id, 0) + n

    def is_running(self, deployment_id: str) -> bool:
        with self._lock:
            return deployment_id in self._runs

    def http_bytes(self, deployment_id: str) -> int:
        with self._lock:
            return self._bytes.get(deployment_id, 0)

    def close(self) -> None:
        for run in self.running():
            run.cancel.set()
        for run in self.running():
            run.done.wait(10)
        with self.side.lock:
            services = list(self.side.services.values())
        for service in services:  # e.g. the BitTorrent seeder's sessions
            close = getattr(service, "close", None)
            if callable(close):
                with contextlib.suppress(Exception):
                    close()

    def _finished(self, run: DeploymentRun) -> None:
        with self._lock:
            self._runs.pop(run.deployment.id, None)
            self._bytes.pop(run.deployment.id, None)
            self._tokens.pop(run.peer_token, None)


class DeploymentRun:
    def __init__(self, coordinator: Coordinator, deployment: Deployment, viewer: User,
                 image: Image, counts: dict[str, int], names: list[str], method: str,
                 options: DeployOptions, started: float) -> None:
        self.c = coordinator
        self.side = coordinator.side
        self.deployment = deployment
        self.viewer = viewer
        self.image = image
        self.method = method
        self.chosen = method
        self.why = ""
        # What was asked, with the server's stall limit when it asked for none: the
        # nodes' methods and this run's wait for a silent agent use the same one.
        self.options = options if options.stall_seconds is not None else \
            replace(options, stall_seconds=float(self.side.config.stall_seconds))
        self.started = started
        self.peer_token = secrets.token_urlsafe(24)
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.nodes = {n: NodeProgress(n, counts.get(n, 0), True) for n in names}
        self._lock = threading.Lock()
        self._last_save = 0.0
        self.repo_bytes_other = 0
        self.placement: dict[str, Any] | None = None

    def fetching(self) -> list[str]:
        with self._lock:
            return [n for n, p in self.nodes.items()
                    if p.needs_image and p.state in ("waiting", "fetching")]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- the run -------------------------------------------------------------------------
    def run(self) -> None:
        repo = self.c.repo
        job: DeploymentJob | None = None
        method = None
        stack = contextlib.ExitStack()
        try:
            states = {s.name: s for s in self.c.nodes.node_states()}
            for name, p in self.nodes.items():
                state = states.get(name)
                p.needs_image = state is None or self.image.id not in state.cached
                if not p.needs_image:
                    p.source = str(TransferMethod.CACHE)
            need = [n for n, p in self.nodes.items() if p.needs_image]
            manifest_id = repo.manifest_id_of(self.image.id)
            if manifest_id is None:
                raise RainError(f"image {self.image.id} has no stored data")
            manifest = repo.load_manifest(manifest_id)
            # A seed file made for this deployment stays while it runs.
            stack.enter_context(self.c.seeds.use(manifest.sha256))
            self.chosen, self.why = choose_method(
                self.method, need, lambda n: _overlap(repo, manifest, states.get(n)))
            if need:
                job = DeploymentJob(
                    id=self.deployment.id, image=self.image, manifest=manifest,
                    manifest_id=manifest_id,
                    nodes=[NodeTarget(n, *self.c.nodes.agent_endpoint(n)) for n in need],
                    peer_token=self.peer_token, options=self.options,
                    seed_file=lambda: self.c.seeds.path(
                        manifest, lambda p: repo.write_sparse(manifest, p, self.image.id)),
                    workdir=self.c.work / self.deployment.id, server=self.side,
                    log=lambda msg: log.info("deployment %s: %s", self.deployment.id[:8], msg))
                job.workdir.mkdir(parents=True, exist_ok=True)
                method = coordinator_method(self.chosen)
                try:
                    plans = method.prepare(job)
                except Exception as exc:
                    # The method cannot run here (no udpcast, a seeder that will not
                    # start, ...): every node pulls from the repository instead.
                    why = exc.message if isinstance(exc, RainError) else repr(exc)
                    log.warning("deployment %s: %s unavailable (%s); using http",
                                self.deployment.id[:8], self.chosen, why)
                    with contextlib.suppress(Exception):
                        method.finish(job)
                    self.why = f"{self.chosen} could not start ({why}); http instead"
                    self.chosen = str(TransferMethod.HTTP)
                    method = coordinator_method(self.chosen)
                    plans = method.prepare(job)
            else:
                plans = {}
            self._save()
            with ThreadPoolExecutor(max_workers=max(1, len(self.nodes)),
                                    thread_name_prefix="deploy-node") as pool:
                futures = [pool.submit(self._node, name, plans.get(name, {}), manifest)
                           for name in self.nodes]
                while not all(f.done() for f in futures):
                    time.sleep(0.2)
                    self._save(throttle=True)
        except Exception as exc:
            log.exception("deployment %s failed", self.deployment.id)
            message = exc.message if isinstance(exc, RainError) else f"{type(exc).__name__}: {exc}"
            for p in self.nodes.values():
                if p.state not in ("ready", "failed"):
                    p.state, p.error = "failed", message
            self.deployment.error = message
        finally:
            if method is not None and job is not None:
                try:
                    method.finish(job)
                    self.repo_bytes_other = method.repo_bytes(job)
                except Exception:
                    log.exception("deployment %s: finishing %s failed", self.deployment.id,
                                  self.chosen)
                shutil.rmtree(job.workdir, ignore_errors=True)
            self._release()
            stack.close()
            self._save(final=True)
            self.c._finished(self)
            self.done.set()

    def _node(self, name: str, plan: dict[str, Any], manifest: ImageManifest) -> None:
        p = self.nodes[name]
        try:
            address, key = self.c.nodes.agent_endpoint(name)
            with AgentClient(name, address, key, context=self.c.agent_context) as agent:
                if p.needs_image:
                    self._fetch(agent, p, plan)
                    # Placement and `auto` see it before the node's next heartbeat.
                    try:
                        self.c.nodes.note_cached(name, self.image.id)
                    except Exception:
                        log.exception("deployment %s: noting %s cached on %s failed",
                                      self.deployment.id[:8], self.image.id, name)
                else:
                    p.fetched_s, p.progress = 0.0, 1.0
                if self.cancel.is_set():
                    raise RainError("deployment cancelled")
                if p.count:
                    self._instances(agent, p)
                p.state = "ready"
                p.ready_s = self.elapsed() if not p.count else max(
                    i["ready_s"] for i in p.instances)
        except Exception as exc:
            message = exc.message if isinstance(exc, RainError) else f"{type(exc).__name__}: {exc}"
            p.state, p.error = "failed", message
            log.warning("deployment %s: node %s failed: %s", self.deployment.id[:8], name,
                        message)
            for inst in p.instances:
                if inst.get("status") != "ready":
                    with contextlib.suppress(Exception):
                        self.c.records.set_instance(inst["id"], status=InstanceStatus.FAILED,
                                                    error=message)

    def _fetch(self, agent: AgentClient, p: NodeProgress, plan: dict[str, Any]) -> None:
        p.state, p.source = "fetching", self.chosen
        status = agent.fetch({
            "image_id": self.image.id, "sha256": self.image.sha256,
            "disk_format": str(self.image.disk_format), "method": self.chosen, "plan": plan,
            "deployment": self.deployment.id, "peer_token": self.peer_token,
            "options": self.options.to_json()})
        if status.get("cached"):
            # It got there since its last heartbeat (another deployment, a prefetch).
            p.source = str(TransferMethod.CACHE)
        total = None
        unreachable_since: float | None = None
        stall = self.options.stall_timeout_seconds
        while status.get("state") == "fetching":
            if self.cancel.is_set():
                with contextlib.suppress(RainError):
                    agent.release(self.image.id)
                raise RainError("deployment cancelled")
            missing = status.get("chunks_missing")
            if missing is not None:
                total = max(total or 0, int(missing))
                p.progress = 1.0 - (int(missing) / total if total else 0.0)
            p.stats = dict(status.get("stats") or {})
            try:
                status = agent.fetch_status(self.image.id, wait=POLL_SECONDS)
                unreachable_since = None
            except RainError as exc:
                # The agent may be busy or the control network slow; a node that stays
                # silent for the stall period is dead for this deployment.
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > stall:
                    raise RainError(f"node lost: {exc.message}") from None
                time.sleep(POLL_SECONDS)
        p.stats = dict(status.get("stats") or {})
        p.fallback = status.get("fallback")
        if status.get("state") != "done":
            raise RainError(status.get("error") or f"transfer {status.get('state')}")
        p.progress = 1.0
        p.fetched_s = self.elapsed()
        # One usage record per node and deployment (its Range requests are not logged).
        with contextlib.suppress(Exception):
            self.c.repo.record_deploy(
                self.image.id, self.viewer,
                int(p.stats.get("repo_bytes", 0)) + int(p.stats.get("peer_bytes", 0)))

    def _instances(self, agent: AgentClient, p: NodeProgress) -> None:
        p.state = "creating"
        ids = [f"{self.deployment.id[:8]}-{p.name}-{k}" for k in range(p.count)]
        self.c.records.add_instances(self.deployment, [(i, p.name, self.image.id) for i in ids])
        opts = self.options
        items = [{"id": i, "image_id": self.image.id, "size": opts.size_bytes,
                  "copy": opts.copy, "ephemeral_size": opts.ephemeral_size_bytes}
                 for i in ids]
        sent = time.time()
        results = agent.create_instances(items)
        now_mono, now_wall = time.monotonic(), time.time()
        failed = []
        for r in results:
            ready_at = r.get("ready_at")
            ready_s = None
            if ready_at is not None:
                # The agent's wall clock, mapped onto ours through the request's span.
                ready_s = (now_mono - self.started) - (now_wall - max(float(ready_at), sent))
            entry = {"id": r.get("id"), "disk": r.get("disk"), "ready_s": _r(ready_s),
                     "status": "ready" if r.get("error") is None else "failed",
                     "error": r.get("error")}
            p.instances.append(entry)
            if r.get("error") is None:
                self.c.records.set_instance(str(r["id"]), status=InstanceStatus.READY,
                                            disk=str(r.get("disk") or ""), ready=utcnow())
            else:
                failed.append(str(r.get("error")))
                self.c.records.set_instance(str(r["id"]), status=InstanceStatus.FAILED,
                                            error=str(r.get("error")))
        if failed:
            raise RainError(f"{len(failed)} of {len(results)} instance disks failed: "
                            f"{failed[0]}")

    def _release(self) -> None:
        """Nodes stop serving the image to peers (seeding, relays) once everyone has it;
        their final counts say what they sent to the others after their own copy was
        complete."""
        def one(name: str) -> None:
            with contextlib.suppress(Exception):
                address, key = self.c.nodes.agent_endpoint(name)
                with AgentClient(name, address, key, timeout=10,
                                 context=self.c.agent_context) as agent:
                    final = agent.release(self.image.id)
                if final.get("deployment") == self.deployment.id and final.get("stats"):
                    self.nodes[name].stats = dict(final["stats"])

        names = [n for n, p in self.nodes.items() if p.needs_image]
        with ThreadPoolExecutor(max_workers=max(1, len(names))) as pool:
            list(pool.map(one, names))

    # -- the report -------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        per_node = {n: p.to_dict() for n, p in self.nodes.items()}
        ready = [p.ready_s for p in self.nodes.values() if p.state == "ready"
                 and p.ready_s is not None]
        firsts = [i["ready_s"] for p in self.nodes.values() for i in p.instances
                  if i.get("ready_s") is not None]
        if not any(p.count for p in self.nodes.values()):
            firsts = [p.ready_s for p in self.nodes.values() if p.ready_s is not None]
        finished = all(p.state in ("ready", "failed") for p in self.nodes.values())
        return {
            "method": self.chosen, "method_asked": self.method, "method_reason": self.why,
            "makespan_s": _r(max(ready)) if ready and finished else None,
            "first_ready_s": _r(min(firsts)) if firsts else None,
            "elapsed_s": _r(self.elapsed()),
            "per_node": per_node,
            "nodes_needing_image": sum(1 for p in self.nodes.values() if p.needs_image),
            "image_size": self.image.size,
            "repo_bytes_sent": self.c.http_bytes(self.deployment.id) + self.repo_bytes_other,
            "peer_bytes_sent": sum(int(p.stats.get("sent_bytes", 0))
                                   for p in self.nodes.values()),
            "peer_bytes_received": sum(int(p.stats.get("peer_bytes", 0))
                                       for p in self.nodes.values()),
            "instances_ready": sum(1 for p in self.nodes.values() for i in p.instances
                                   if i.get("status") == "ready"),
            "instances_failed": sum(1 for p in self.nodes.values() for i in p.instances
                                    if i.get("status") == "failed"),
            "errors": {n: p.error for n, p in self.nodes.items() if p.error},
            "placement": self.placement,
        }

    def _save(self, *, throttle: bool = False, final: bool = False) -> None:
        now = time.monotonic()
        if throttle and now - self._last_save < SAVE_SECONDS:
            return
        self._last_save = now
        report = self.report()
        fields: dict[str, Any] = {"report": report}
        if final:
            states = [p.state for p in self.nodes.values()]
            if self.cancel.is_set():
                status = DeploymentStatus.CANCELLED
            elif states and all(s == "ready" for s in states):
                status = DeploymentStatus.READY
            elif any(s == "ready" for s in states):
                status = DeploymentStatus.PARTIAL
            else:
                status = DeploymentStatus.FAILED
            fields.update(status=status, finished=utcnow(),
                          error=self.deployment.error or _first_error(report))
        try:
            self.c.records.save_deployment(self.deployment.id, **fields)
        except Exception:
            log.exception("deployment %s: saving its report failed", self.deployment.id)


def _first_error(report: dict[str, Any]) -> str | None:
    errors = report.get("errors") or {}
    if not errors:
        return None
    node, message = next(iter(errors.items()))
    more = f" (and {len(errors) - 1} more nodes)" if len(errors) > 1 else ""
    return f"node {node}: {message}{more}"


def _overlap(repo: Repository, manifest: ImageManifest, state: NodeState | None) -> float:
    """Fraction of the image's data bytes the node already holds in other cached images."""
    if state is None or not state.cached:
        return 0.0
    want: dict[bytes, int] = {}
    for i, d in enumerate(manifest.chunks):
        if d != ZERO_DIGEST:
            want[d] = want.get(d, 0) + manifest.chunk_length(i)
    total = sum(want.values())
    if not total:
        return 1.0
    have = repo.chunk_digests(state.cached)
    return sum(n for d, n in want.items() if d in have) / total
