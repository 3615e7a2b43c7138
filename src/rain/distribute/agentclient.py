"""The repository's side of the agent API (rain.agent.server): one node, its key."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from rain.client.connection import json_session
from rain.model.errors import AgentUnreachable
from rain.model.wire import raise_for_error


class AgentClient:
    def __init__(self, name: str, address: str, key: str, *, timeout: float = 30.0,
                 context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.address = address.rstrip("/")
        self._http = json_session(self.address, key, timeout=timeout, connect_timeout=5.0,
                                  context=context)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, *, timeout: float | None = None,
              **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, timeout=timeout or httpx.USE_CLIENT_DEFAULT,
                                      **kw)
        except httpx.TransportError as exc:
            raise AgentUnreachable(f"node {self.name} ({self.address}) did not answer: "
                                   f"{exc or type(exc).__name__}") from None
        raise_for_error(resp.status_code, resp.content, f"node {self.name}")
        return resp.json() if resp.content else None

    def fetch(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/fetch", json=request))

    def fetch_status(self, image_id: str, wait: float = 0.0) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/fetch/{image_id}", params={"wait": wait},
                               timeout=wait + 30.0))

    def release(self, image_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/fetch/{image_id}"))

    def create_instances(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(self._call("POST", "/v1/instances", json={"instances": items},
                               timeout=300.0)["instances"])

    def instances(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/instances")["instances"])

    def delete_instance(self, instance_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/instances/{instance_id}"))

    def cache(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/cache"))

    def evict(self, image_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/cache/{image_id}"))

    def grant(self, peer_token: str, image_id: str) -> dict[str, Any]:
        """Have the node serve its cached `image_id` to the bearers of `peer_token`."""
        return dict(self._call("POST", "/v1/grants",
                               json={"peer_token": peer_token, "image_id": image_id}))

    def revoke(self, peer_token: str) -> dict[str, Any]:
        return dict(self._call("DELETE", "/v1/grants", json={"peer_token": peer_token}))

    def state(self) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/state"))
