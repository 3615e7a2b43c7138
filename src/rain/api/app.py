"""The HTTP service: `create_app` wires a Repository into FastAPI."""

from __future__ import annotations

from fastapi import FastAPI

from rain import __version__
from rain.api import errors, images, misc
from rain.repo import Repository


def create_app(repository: Repository) -> FastAPI:
    app = FastAPI(
        title="rain",
        version=__version__,
        description="Virtual machine image repository: push, pull, search, share, match.",
    )
    app.state.repo = repository
    errors.install(app)
    app.include_router(images.router)
    app.include_router(misc.router)
    return app
