"""HTTP service: native `/v1` API, auth, OpenAPI."""

from rain.api.app import create_app

__all__ = ["create_app"]
