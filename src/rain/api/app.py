"""The HTTP service: `create_app` wires a Repository into FastAPI."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from rain import __version__
from rain.api import (
    builds,
    deployments,
    errors,
    images,
    match,
    nodes,
    service,
    tracker,
    usage,
    users,
)
from rain.build.jobs import BuildQueue
from rain.catalog import Catalog
from rain.deploy.config import DistributeConfig
from rain.deploy.coordinator import Coordinator
from rain.deploy.service import DeploymentService
from rain.distribute.methods.base import RepoSide
from rain.repo import Repository
from rain.schedule import ScheduleConfig
from rain.schedule.policy import check_config


def create_app(repository: Repository, build_queue: BuildQueue | None = None,
               coordinator: Coordinator | None = None,
               schedule: ScheduleConfig | None = None, *,
               catalog: Catalog | None = None) -> FastAPI:
    """The app; without a build queue, one that cannot build (501) is made; without a
    coordinator, one for a server on loopback keeping nodes and deployments in `catalog`
    (the repository's database); placement by `schedule` (or the defaults)."""
    # /docs and /redoc from files shipped in the fastapi-offline package, not a CDN: they
    # work on a machine without Internet access. No validator badge (another site).
    app = FastAPIOffline(
        static_url="/docs/static", swagger_ui_parameters={"validatorUrl": None},
        title="rain",
        version=__version__,
        description="Virtual machine images: build from templates, push, pull, search, share, "
                    "match, purge and rebuild; node agents, deployments and instances.",
    )
    app.state.repo = repository
    app.state.schedule = schedule or ScheduleConfig()
    check_config(app.state.schedule)
    if build_queue is None:
        build_queue = BuildQueue(repository, None)
        repository.rebuilder = build_queue
    app.state.builds = build_queue
    if coordinator is None:
        if catalog is None:
            raise TypeError("create_app needs a coordinator, or the catalog to make one over")
        coordinator = Coordinator(repository, RepoSide(repository, DistributeConfig(),
                                                       "127.0.0.1", 0,
                                                       repository.work_dir.parent), catalog)
    app.state.coordinator = coordinator
    app.state.deployments = DeploymentService(repository, coordinator, app.state.schedule)
    app.state.distribution = coordinator.side
    errors.install(app)
    app.include_router(builds.router)
    app.include_router(images.router)
    app.include_router(service.router)
    app.include_router(match.router)
    app.include_router(usage.router)
    app.include_router(users.router)
    app.include_router(nodes.router)
    app.include_router(deployments.router)
    app.include_router(tracker.router)
    return app
