"""One exception hierarchy for all of rain.

The HTTP layer maps these to status codes in one place (`rain.api.errors`) and
the CLI maps them to one-line messages in one place (`rain.cli.main`). Each
class carries a stable machine-readable `code` so clients can tell them apart
without parsing messages.
"""

from __future__ import annotations

from typing import Any


class RainError(Exception):
    """Base of every error rain raises on purpose."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        # Extra machine-readable fields, sent beside code and message in the JSON error.
        self.details: dict[str, Any] = dict(details or {})

    def __str__(self) -> str:
        return self.message


class InvalidRequest(RainError):
    code = "invalid_request"
    status = 400


class Unauthorized(RainError):
    code = "unauthorized"
    status = 401


class Forbidden(RainError):
    code = "forbidden"
    status = 403


class NotFound(RainError):
    code = "not_found"
    status = 404


class Conflict(RainError):
    code = "conflict"
    status = 409


class AmbiguousReference(Conflict):
    """A name or id prefix matches several things the caller may see; `candidates` in
    the details holds their ids."""

    code = "ambiguous_reference"


class QuotaExceeded(RainError):
    code = "quota_exceeded"
    status = 413


class ImageTooLarge(RainError):
    """The image is over the server's size cap (`[repo] max_image_size`, Glance's
    `image_size_cap`): refused from its declared size, or as its bytes arrive."""

    code = "image_too_large"
    status = 413


class TooManyRequests(RainError):
    """Too much at once (e.g. uploads in progress): try again after `retry_after` seconds."""

    code = "too_many_requests"
    status = 429

    def __init__(self, message: str, *, retry_after: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        merged = dict(details or {})
        if retry_after is not None:
            merged["retry_after"] = retry_after
        super().__init__(message, details=merged)


class InvalidImage(RainError):
    """The image content is unsafe, inconsistent or not what it claims to be."""

    code = "invalid_image"
    status = 422


class Unsupported(RainError):
    """This server cannot do it at all (e.g. it has no image builder installed)."""

    code = "not_implemented"
    status = 501


class Unavailable(RainError):
    """Not now: try again later (`retry_after` seconds, when known)."""

    code = "unavailable"
    status = 503

    @property
    def retry_after(self) -> int | None:
        value = self.details.get("retry_after")
        return int(value) if value is not None else None


class ImageRebuilding(Unavailable):
    """The image was purged and is being rebuilt by build `build_id`; pull it again later."""

    code = "image_rebuilding"

    def __init__(self, message: str, *, build_id: str = "", retry_after: int | None = None,
                 details: dict[str, Any] | None = None) -> None:
        merged = dict(details or {})
        if build_id:
            merged["build_id"] = build_id
        if retry_after is not None:
            merged["retry_after"] = retry_after
        super().__init__(message, details=merged)

    @property
    def build_id(self) -> str:
        return str(self.details.get("build_id") or "")


class AgentUnreachable(RainError):
    """A node's agent did not answer (down, or the network between us is)."""

    code = "agent_unreachable"
    status = 502


class StoreCorruption(RainError):
    """Data read back from the store does not match its digest."""

    code = "store_corruption"
    status = 500


class ToolFailed(RainError):
    """An external tool (qemu-img, debootstrap, ...) failed; message has its stderr."""

    code = "tool_failed"
    status = 500

    def __init__(self, message: str, *, tool: str = "", stderr: str = "") -> None:
        super().__init__(message)
        self.tool = tool
        self.stderr = stderr


class BuildCancelled(RainError):
    """Raised inside a running build once it was asked to stop (rain.build.progress)."""

    code = "build_cancelled"
    status = 409


ERRORS_BY_CODE: dict[str, type[RainError]] = {
    cls.code: cls
    for cls in (
        RainError,
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        Conflict,
        AmbiguousReference,
        QuotaExceeded,
        ImageTooLarge,
        TooManyRequests,
        InvalidImage,
        Unsupported,
        Unavailable,
        ImageRebuilding,
        AgentUnreachable,
        StoreCorruption,
        ToolFailed,
        BuildCancelled,
    )
}
