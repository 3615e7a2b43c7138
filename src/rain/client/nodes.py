"""Client calls for node agents, image manifests, deployments and instances (mixed into
`Client`). Node agents use the first ones with their node token."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from rain.model.errors import RainError

DIGEST_LEN = 32


class NodeCalls:
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    # -- nodes -------------------------------------------------------------------
    def register_node(self, report: dict[str, Any]) -> dict[str, Any]:
        """Register (or re-register) a node: `report` has `name`, `address`, `agent_key`
        and what the agent knows of itself. Returns the node (without its key)."""
        return dict(self._request("POST", "/v1/nodes", json=report))

    def heartbeat(self, name: str, report: dict[str, Any]) -> dict[str, Any]:
        return dict(self._request("PUT", f"/v1/nodes/{name}", json=report))

    def nodes(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/nodes")["nodes"])

    def node(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/nodes/{name}"))

    def remove_node(self, name: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/nodes/{name}"))

    # -- images ------------------------------------------------------------------
    def manifest(self, ref: str) -> dict[str, Any]:
        """The image's manifest, with `chunks` as a list of 32-byte digests."""
        found = dict(self._request("GET", f"/v1/images/{ref}/manifest"))
        try:
            raw = base64.b64decode(found["chunks"], validate=True)
        except (binascii.Error, TypeError, KeyError):
            raise RainError(f"the manifest of {ref} from the server is malformed") from None
        if len(raw) != DIGEST_LEN * int(found.get("count", -1)):
            raise RainError(f"the manifest of {ref} from the server has {len(raw)} bytes of "
                            f"digests for {found.get('count')} chunks")
        found["chunks"] = [raw[i:i + DIGEST_LEN] for i in range(0, len(raw), DIGEST_LEN)]
        return found

    # -- deployments and instances ---------------------------------------------------
    def deployments(self, image: str | None = None, limit: int = 100,
                    offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if image:
            params["image"] = image
        return dict(self._request("GET", "/v1/deployments", params=params))

    def deployment(self, deployment_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/deployments/{deployment_id}"))

    def instances(self, node: str | None = None, deployment: str | None = None,
                  all: bool = False) -> list[dict[str, Any]]:
        """Your instances (admins: everyone's); `all`: deleted ones too."""
        params: dict[str, Any] = {"all": str(all).lower()}
        if node:
            params["node"] = node
        if deployment:
            params["deployment"] = deployment
        return list(self._request("GET", "/v1/instances", params=params)["instances"])

    def instance(self, instance_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/instances/{instance_id}"))
