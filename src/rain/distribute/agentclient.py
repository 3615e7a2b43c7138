"""The repository's side of the agent API (rain.agent.server): one node, its key."""

from __future__ import annotations

import functools
import ssl
from typing import Any

import httpx

from rain.distribute.source import raise_for
from rain.model.errors import RainError


@functools.cache
def _default_context() -> ssl.SSLContext:
    """One context for all clients: loading the system CAs costs ~30 ms of CPU, and the
    coordinator makes a client per node per deployment."""
    return ssl.create_default_context()


class AgentUnreachable(RainError):
    """The node's agent did not answer (down, or the network between us is)."""

    code = "agent_unreachable"
    status = 502


class AgentClient:
    def __init__(self, name: str, address: str, key: str, *, timeout: float = 30.0,
                 context: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.address = address.rstrip("/")
        verify = context if context is not None else _default_context()
        self._http = httpx.Client(base_url=self.address, timeout=httpx.Timeout(timeout,
                                  connect=5.0), headers={"Authorization": f"Bearer {key}"},
                                  verify=verify)

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
        raise_for(resp.status_code, resp.content, f"node {self.name}")
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
