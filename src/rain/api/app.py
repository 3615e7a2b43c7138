"""The HTTP service: `create_app` wires a Repository into FastAPI."""

from __future__ import annotations

from fastapi import FastAPI

from rain import __version__
from rain.api import builds, errors, images, misc
from rain.build.jobs import BuildQueue
from rain.repo import Repository


def create_app(repository: Repository, build_queue: BuildQueue | None = None) -> FastAPI:
    """The app; without a build queue, one that cannot build (501) is made."""
    app = FastAPI(
        title="rain",
        version=__version__,
        description="Virtual machine images: build from templates, push, pull, search, share, "
                    "match, purge and rebuild.",
    )
    app.state.repo = repository
    if build_queue is None:
        build_queue = BuildQueue(repository, None)
        repository.rebuilder = build_queue
    app.state.builds = build_queue
    errors.install(app)
    app.include_router(builds.router)
    app.include_router(images.router)
    app.include_router(misc.router)
    return app
