"""Client calls for administration: users, groups and tokens (mixed into `Client`)."""

from __future__ import annotations

from typing import Any


class UserCalls:
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        raise NotImplementedError

    # -- users -------------------------------------------------------------------
    def users(self, *, include_deleted: bool = False) -> list[dict[str, Any]]:
        params = {"all": "true"} if include_deleted else {}
        return list(self._request("GET", "/v1/users", params=params)["users"])

    def user(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/users/{name}"))

    def set_user_disabled(self, name: str, disabled: bool) -> dict[str, Any]:
        return dict(self._request("PATCH", f"/v1/users/{name}", json={"disabled": disabled}))

    def delete_user(self, name: str, *, transfer_to: str | None = None) -> dict[str, Any]:
        params = {"transfer_to": transfer_to} if transfer_to else {}
        return dict(self._request("DELETE", f"/v1/users/{name}", params=params))

    # -- groups ------------------------------------------------------------------
    def groups(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/groups")["groups"])

    def group(self, name: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/groups/{name}"))

    def create_group(self, name: str) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/groups", json={"name": name}))

    def delete_group(self, name: str) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/groups/{name}"))

    def add_group_members(self, name: str, users: list[str]) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/groups/{name}/members", json={"users": users}))

    def remove_group_members(self, name: str, users: list[str]) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/groups/{name}/members",
                                  params=[("user", u) for u in users]))

    # -- tokens ------------------------------------------------------------------
    def tokens(self, *, user: str | None = None, node: str | None = None,
               everyone: bool = False) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"user": user, "node": node,
                                    "all": "true" if everyone else None}.items() if v}
        return list(self._request("GET", "/v1/tokens", params=params)["tokens"])

    def create_token(self, *, label: str = "", user: str | None = None,
                     node: str | None = None) -> dict[str, Any]:
        """A new token (admins: for `user`, or a node token for `node`); `token` in the
        answer is the secret, shown this once."""
        body = {k: v for k, v in {"label": label, "user": user, "node": node}.items()
                if v is not None}
        return dict(self._request("POST", "/v1/tokens", json=body))

    def revoke_token(self, token_id: int) -> dict[str, Any]:
        return dict(self._request("DELETE", f"/v1/tokens/{int(token_id)}"))
