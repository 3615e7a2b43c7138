"""`http`: every node pulls the image from the repository (unicast, the baseline).

The node asks for runs of the chunks it lacks as HTTP Range requests and
resumes from the first missing chunk after a cut connection
(rain.distribute.source). The repository's upload is shared by all nodes,
so N nodes take N·S/R_repo: what the other methods are measured against.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from rain.distribute.methods.base import DeploymentJob, FetchContext


class HttpNode:
    name: ClassVar[str] = "http"

    def fetch(self, ctx: FetchContext) -> None:
        ctx.repo.fetch(ctx.image_id, ctx.partial, stats=ctx.stats, cancel=ctx.cancel)

    def cached(self, ctx: FetchContext, path: Path) -> None:
        return None

    def release(self, image_id: str) -> None:
        return None


class HttpCoordinator:
    name: ClassVar[str] = "http"

    def prepare(self, job: DeploymentJob) -> dict[str, dict[str, Any]]:
        return {node.name: {} for node in job.nodes}

    def finish(self, job: DeploymentJob) -> None:
        return None

    def repo_bytes(self, job: DeploymentJob) -> int:
        return 0  # all of it went through the HTTP file endpoint, which counts itself


NODE = HttpNode()
COORDINATOR = HttpCoordinator()
