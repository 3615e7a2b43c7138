"""What the image-file endpoints share, whichever server front end runs them."""

from __future__ import annotations

import base64

from rain.repo import Download

# How much of a refused upload's body the server reads (and drops) before it
# answers, so a client still sending sees the error instead of a reset.
DRAIN_LIMIT = 256 * 1024 * 1024


def download_headers(d: Download) -> dict[str, str]:
    b64 = base64.b64encode(bytes.fromhex(d.sha256)).decode()
    return {
        "ETag": f'"{d.sha256}"',
        "Accept-Ranges": "bytes",
        "Repr-Digest": f"sha-256=:{b64}:",
        "Digest": f"sha-256={b64}",
        "X-Rain-Sha256": d.sha256,
        "X-Rain-Image-Id": d.image.id,
        "X-Rain-Disk-Format": str(d.disk_format),
        "Content-Disposition": f'attachment; filename="{d.image.name}.{d.disk_format}"',
        "Content-Type": "application/octet-stream",
    }


def bearer_token(authorization: str | None, x_auth_token: str | None) -> str | None:
    """Bearer token, or OpenStack's X-Auth-Token; None means anonymous."""
    auth = authorization or ""
    token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
    return token or x_auth_token or None
