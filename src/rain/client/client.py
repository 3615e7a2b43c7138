"""`Client`: every `/v1` call as a method, errors as rain's own exceptions.

Bulk transfers stream in 1 MiB blocks; `pull` verifies the image's SHA-256 as
it writes (hashing in a second thread) and writes zero blocks as holes, so a
mostly empty disk image stays sparse on the client too.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from rain.client.builds import BuildCalls, BuildUpdate
from rain.client.connection import json_session, request_headers, tls_context
from rain.client.deployments import DeployCalls
from rain.client.nodes import NodeCalls
from rain.client.transfer import BUSY, Phase, download_file, upload_file
from rain.client.users import UserCalls
from rain.model.errors import ImageRebuilding, InvalidImage, RainError
from rain.model.wire import raise_for_error

DEFAULT_URL = "http://127.0.0.1:8480"
BLOCK = 1024 * 1024
Progress = Callable[[int], None]


class Client(BuildCalls, NodeCalls, DeployCalls, UserCalls):
    def __init__(self, url: str | None = None, token: str | None = None, *,
                 timeout: float = 300.0, sparse: bool = True, ca: str | None = None) -> None:
        self.url = server_url(url or os.environ.get("RAIN_URL") or DEFAULT_URL)
        # A CA bundle for an https server with a private certificate (RAIN_CA).
        self.context = tls_context(ca or os.environ.get("RAIN_CA") or None)
        self.token = api_token(token if token is not None else os.environ.get("RAIN_TOKEN"))
        self.timeout = timeout
        # Leave zero chunks out of image transfers when the server agrees (rain.model.sparse).
        self.sparse = sparse
        self._auth = request_headers(self.token)
        self._http = json_session(self.url, self.token, timeout=timeout, context=self.context)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise RainError(f"cannot reach rain at {self.url}: {exc}") from None
        raise_for_error(resp.status_code, resp.content)
        return resp.json() if resp.content else None

    # -- images ---------------------------------------------------------------
    def create_image(self, **meta: Any) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/images", json=meta))

    def upload(self, ref: str, path: Path, *, disk_format: str | None = None,
               progress: Progress | None = None, phase: Phase | None = None) -> dict[str, Any]:
        """`progress(n)`: bytes of the file done; `phase(what, total)`: what it does now
        (rain.client.transfer)."""
        query = f"?disk_format={disk_format}" if disk_format else ""
        # A server at its limit of uploads in progress answers 429 before any work: wait
        # as it says and try again, for as long as a transfer may take (`timeout`).
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = upload_file(f"{self.url}/v1/images/{ref}/file{query}", Path(path),
                                    self._auth, timeout=self.timeout, progress=progress,
                                    sparse=self.sparse, context=self.context, phase=phase)
            except OSError as exc:
                raise RainError(f"upload of {path} was cut off before the server answered "
                                f"({exc}); the image was not stored") from None
            wait = _retry_after(reply.headers) if reply.status == 429 else None
            if wait is None or time.monotonic() + wait > deadline:
                break
            if phase:
                phase(BUSY, None)
            time.sleep(wait)
        raise_for_error(reply.status, reply.body)
        return dict(json.loads(reply.body))

    def push(self, path: str | Path, *, name: str, disk_format: str | None = None,
             progress: Progress | None = None, phase: Phase | None = None,
             **meta: Any) -> dict[str, Any]:
        """Create the record and upload the data; returns the active image."""
        path = Path(path)
        image_file_size(path)
        image = self.create_image(name=name, **{k: v for k, v in meta.items() if v is not None})
        return self.upload(image["id"], path, disk_format=disk_format, progress=progress,
                           phase=phase)

    def pull(self, ref: str, out: str | Path, *, format: str | None = None,
             progress: Progress | None = None, wait_for_rebuild: bool = True,
             on_rebuild: BuildUpdate | None = None,
             phase: Phase | None = None) -> dict[str, Any]:
        """Download to `out` (via a temp file, renamed once the SHA-256 is verified).

        A purged image is rebuilt by the server first: the pull follows that
        build (`on_rebuild` sees its progress) and then downloads the new
        content — unless `wait_for_rebuild` is False, when ImageRebuilding is raised.
        """
        for _attempt in range(3):
            try:
                return self._pull_once(ref, out, format=format, progress=progress,
                                       phase=phase)
            except ImageRebuilding as exc:
                if not wait_for_rebuild:
                    raise
                build_id = exc.build_id or self.rebuild_build_id(ref)
                if build_id is None:  # finished between the two calls: try again
                    continue
                build = self.follow_build(build_id, on_rebuild,
                                          interval=min(exc.retry_after or 2, 2))
                if build["status"] != "succeeded":
                    raise RainError(f"{ref} was purged and its rebuild (build {build_id}) "
                                    f"{build['status']}: {build.get('error') or 'no reason'}"
                                    ) from None
        return self._pull_once(ref, out, format=format, progress=progress, phase=phase)

    def _pull_once(self, ref: str, out: str | Path, *, format: str | None = None,
                   progress: Progress | None = None,
                   phase: Phase | None = None) -> dict[str, Any]:
        out = Path(out)
        tmp = out.with_name(f".{out.name}.part")
        query = f"?format={format}" if format else ""
        try:
            got = download_file(f"{self.url}/v1/images/{ref}/file{query}", tmp, self._auth,
                                timeout=self.timeout, progress=progress, sparse=self.sparse,
                                context=self.context, phase=phase, converting=bool(format))
            reply = got.reply
            raise_for_error(reply.status, reply.body)
            sent = reply.headers.get("x-rain-disk-format")
            if format and sent and sent != format and (format, sent) != ("raw", "iso"):
                raise RainError(f"asked for {ref} as {format}, the server sent {sent}; "
                                "nothing was written")
            expected = reply.headers.get("x-rain-sha256", "")
            if not got.complete:
                length = reply.headers.get("content-length", "?")
                raise RainError(f"download of {ref} was cut short at {got.size} of "
                                f"{length} bytes")
            if expected and got.sha256 != expected:
                raise InvalidImage(f"download of {ref} is corrupt: sha256 {got.sha256} != "
                                   f"{expected}")
            os.replace(tmp, out)
        except OSError as exc:
            raise RainError(f"download of {ref} failed: {exc}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return {"id": reply.headers.get("x-rain-image-id"), "path": str(out), "size": got.size,
                "sha256": got.sha256, "disk_format": reply.headers.get("x-rain-disk-format")}

    def get_range(self, ref: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the image: one HTTP Range request."""
        try:
            resp = self._http.get(f"/v1/images/{ref}/file",
                                  headers={"Range": f"bytes={start}-{end - 1}"})
        except httpx.TransportError as exc:
            raise RainError(f"cannot reach rain at {self.url}: {exc}") from None
        raise_for_error(resp.status_code, resp.content)
        return resp.content

    def images(self, **filters: Any) -> dict[str, Any]:
        params = {k: v for k, v in filters.items() if v is not None and v != []}
        return dict(self._request("GET", "/v1/images", params=params))

    def show(self, ref: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/v1/images/{ref}"))

    def update(self, ref: str, **changes: Any) -> dict[str, Any]:
        return dict(self._request("PATCH", f"/v1/images/{ref}", json=changes))

    def rescan(self, ref: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/v1/images/{ref}/rescan"))

    def delete(self, ref: str, *, force: bool = False) -> dict[str, Any]:
        params = {"force": "true"} if force else None
        return dict(self._request("DELETE", f"/v1/images/{ref}", params=params))

    def share(self, ref: str, *, user: str | None = None,
              group: str | None = None) -> dict[str, Any]:
        body = {"user": user} if user else {"group": group}
        return dict(self._request("POST", f"/v1/images/{ref}/members", json=body))

    def unshare(self, ref: str, *, user: str | None = None,
                group: str | None = None) -> dict[str, Any]:
        params = {"user": user} if user else {"group": group}
        return dict(self._request("DELETE", f"/v1/images/{ref}/members", params=params))

    def match(self, requirements: dict[str, Any], preferences: list[str],
              limit: int = 20) -> list[dict[str, Any]]:
        return list(self.match_report(requirements, preferences, limit)["matches"])

    def match_report(self, requirements: dict[str, Any], preferences: list[str],
                     limit: int = 20) -> dict[str, Any]:
        """`matches`, and `eliminated`: how many candidates each requirement removed."""
        body = {"requirements": requirements, "preferences": preferences, "limit": limit}
        return dict(self._request("POST", "/v1/match", json=body))

    def usage(self, image: str | None = None, user: str | None = None) -> dict[str, Any]:
        params = {k: v for k, v in {"image": image, "by": user}.items() if v}
        return dict(self._request("GET", "/v1/usage", params=params))

    # -- users and service -----------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/users/me"))

    def create_user(self, name: str, *, admin: bool = False, groups: list[str] | None = None,
                    quota_bytes: int | None = None,
                    quota_images: int | None = None) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/users", json={
            "name": name, "admin": admin, "groups": groups or [], "quota_bytes": quota_bytes,
            "quota_images": quota_images}))

    def gc(self) -> dict[str, Any]:
        return dict(self._request("POST", "/v1/gc"))

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/health"))


def image_file_size(path: Path) -> int:
    """The size of a file that can be pushed; what is wrong with it otherwise (checked
    before an image record is created for it)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise RainError(f"{path}: no such file") from None
    except OSError as exc:
        raise RainError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise RainError(f"{path}: is a directory; push a disk image file")
    if not stat.S_ISREG(st.st_mode):
        raise RainError(f"{path}: not a regular file (a device, pipe or socket); push a disk "
                        "image file, e.g. one written by qemu-img")
    if st.st_size == 0:
        raise RainError(f"{path}: is empty (0 bytes); an image needs at least one byte")
    return st.st_size


def server_url(text: str) -> str:
    """The server's base URL, checked here so that a typo is one clear error, not a
    traceback from deep inside the HTTP library on the first request."""
    hint = "expected e.g. http://127.0.0.1:8480 or https://repo.example:8480"
    try:
        parsed = httpx.URL(text.strip())
    except httpx.InvalidURL as exc:
        raise RainError(f"bad server URL {text!r} ({exc}): {hint}") from None
    if parsed.scheme not in ("http", "https"):
        why = f"scheme {parsed.scheme!r} is not http or https" if parsed.scheme else "no scheme"
        raise RainError(f"bad server URL {text!r} ({why}): {hint}")
    if not parsed.host:
        raise RainError(f"bad server URL {text!r} (no host): {hint}")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise RainError(f"bad server URL {text!r} (port {parsed.port} is not 1-65535): {hint}")
    if parsed.query or parsed.fragment:
        raise RainError(f"bad server URL {text!r} (a query or fragment has no place in it): "
                        f"{hint}")
    return text.strip().rstrip("/")


def api_token(token: str | None) -> str | None:
    """A token as given, less surrounding whitespace (a pasted newline); refused when it
    holds characters no token has, which could not go into an HTTP header anyway.
    The token itself is never echoed: it is a secret."""
    if token is None:
        return None
    token = token.strip()
    if token and not all("!" <= ch <= "~" for ch in token):
        raise RainError("the API token (--token or RAIN_TOKEN) holds spaces, control or "
                        "non-ASCII characters; tokens are printable ASCII, e.g. as in "
                        "var/admin.token")
    return token or None


def _retry_after(headers: dict[str, str]) -> float:
    try:
        return min(max(float(headers.get("retry-after", "5")), 1.0), 60.0)
    except ValueError:
        return 5.0
