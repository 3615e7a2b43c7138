"""Client calls that start and follow deployments (mixed into `Client`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from rain.model.deploy import DeployOptions
from rain.model.node import DeploymentStatus

DeploymentUpdate = Callable[[dict[str, Any]], None]
FINISHED = tuple(str(s) for s in DeploymentStatus if s.finished)
# The options as a script may give them: typed, or the API's JSON object (checked here,
# so a bad one fails before anything is sent).
Options = DeployOptions | Mapping[str, Any] | None


class DeployCalls:
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    def deploy(self, image: str, *, nodes: list[str] | None = None, all: bool = False,
               count: int = 1, method: str | None = None, options: Options = None,
               policy: str | None = None) -> dict[str, Any]:
        """Start `count` instances of `image` on the named nodes (or all); returns the
        deployment at once — `follow_deployment` waits for it. `policy`: "spread" or
        "pack" (None: the server's default)."""
        what: dict[str, Any] = {"count": count}
        if policy:
            what["policy"] = policy
        return self._deployment(image, nodes, all, method, options, **what)

    def prefetch(self, image: str, *, nodes: list[str] | None = None, all: bool = False,
                 method: str | None = None, options: Options = None) -> dict[str, Any]:
        """Copy `image` into the nodes' caches without starting anything."""
        return self._deployment(image, nodes, all, method, options, prefetch=True)

    def _deployment(self, image: str, nodes: list[str] | None, all: bool, method: str | None,
                    options: Options, **what: Any) -> dict[str, Any]:
        if not isinstance(options, DeployOptions):
            options = DeployOptions.from_json(dict(options or {}))
        body: dict[str, Any] = {"image": image, "all": all, "options": options.to_json(),
                                **what}
        if nodes:
            body["nodes"] = nodes
        if method:
            body["method"] = method
        return dict(self._request("POST", "/v1/deployments", json=body))

    def cancel_deployment(self, deployment_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/deployments/{deployment_id}/cancel"))

    def delete_instance(self, instance_id: str, forget: bool = False) -> dict[str, Any]:
        params = {"forget": "true"} if forget else None
        return dict(self._request("DELETE", f"/v1/instances/{instance_id}", params=params))

    def follow_deployment(self, deployment_id: str, on_update: DeploymentUpdate | None = None,
                          *, interval: float = 0.5,
                          timeout: float | None = None) -> dict[str, Any]:
        """Poll until the deployment is over; `on_update` sees every answer."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            dep = dict(self._request("GET", f"/v1/deployments/{deployment_id}"))
            if on_update is not None:
                on_update(dep)
            if dep["status"] in FINISHED:
                return dep
            if deadline is not None and time.monotonic() > deadline:
                return dep
            time.sleep(interval)
