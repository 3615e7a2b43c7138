"""The popularity prefetcher: copy the most deployed images to nodes before anyone asks.

Seed 002: a few images account for most instances, so having them cached
ahead removes the download from most deployments. Every `interval_seconds`
the server counts deployments per image over the last `window_seconds`
(rain.schedule.popular_images), plans which of the `top_k` images go to
which nodes that lack them (rain.schedule.prefetch_plan: at most
`max_per_node` per node and `budget_bytes` per round), and starts one
prefetch deployment per image. Throttled three ways: one prefetch round at a
time (a round waits for the previous one), the byte budget, and a per-node
rate cap (`max_rate` bytes/s) so prefetching never crowds out a real deployment.
Off by default: it spends bandwidth nobody asked for (`[prefetch] enabled`).
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from rain.deploy.config import PrefetchConfig, check_prefetch
from rain.deploy.coordinator import Coordinator
from rain.model import Deployment, ImageStatus
from rain.model.clock import utcnow
from rain.model.deploy import DeployOptions
from rain.repo import Repository
from rain.schedule import popular_images, prefetch_plan

log = logging.getLogger("rain.prefetch")


class Prefetcher:
    def __init__(self, repo: Repository, coordinator: Coordinator, config: PrefetchConfig) -> None:
        check_prefetch(config)
        self.repo = repo
        self.coordinator = coordinator
        self.config = config
        self._stop = threading.Event()
        self._round: list[str] = []  # deployment ids of the last round
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not self.config.enabled:
            return
        self._thread = threading.Thread(target=self._loop, name="prefetch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval_seconds):
            try:
                self.run_once()
            except Exception:
                log.exception("prefetch round failed")

    def run_once(self) -> list[Deployment]:
        """One round: the deployments it started (none while the last round still runs)."""
        if any(not self.coordinator.wait(d, 0) for d in self._round):
            return []
        cfg = self.config
        now = utcnow()
        since = now - timedelta(seconds=cfg.window_seconds)
        times = self.coordinator.records.deployment_times(since)
        popular = popular_images(times, cfg.window_seconds, cfg.top_k, now=now)
        images, owners = {}, {}
        for image_id in popular:
            try:
                image, owner = self.repo.image_with_owner(image_id)
            except Exception:
                continue
            if image.status == ImageStatus.ACTIVE and image.size:
                images[image_id], owners[image_id] = image, owner
        states = self.coordinator.nodes.node_states()
        orders = prefetch_plan([i for i in popular if i in images], states, cfg.max_per_node,
                               cfg.budget_bytes, {i: int(im.size or 0)
                                                  for i, im in images.items()})
        by_image: dict[str, list[str]] = {}
        for order in orders:
            by_image.setdefault(order.image_id, []).append(order.node)
        options = DeployOptions(max_rate_bytes_per_s=cfg.max_rate or None)
        started = []
        for image_id, nodes in by_image.items():
            image, owner = images[image_id], owners[image_id]
            dep = self.coordinator.deploy(owner, image, placements=[], targets=sorted(nodes),
                                          method="auto", options=options, prefetch=True)
            log.info("prefetching %s (%s) to %s", image.name, image_id, ", ".join(nodes))
            started.append(dep)
        self._round = [d.id for d in started]
        return started
