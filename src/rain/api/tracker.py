"""`/v1/tracker/{peer_token}/announce`: the BitTorrent tracker of running deployments.

BitTorrent clients speak their own protocol here, not rain's API: the
arguments are a raw query string with binary values, the answer is a
bencoded dictionary, and errors are a `failure reason` with status 200
(rain.distribute.methods.bittorrent.tracker). The peer token in the path is the
credential, so the route takes no bearer token.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from rain.distribute.methods.bittorrent.tracker import SERVICE, TrackerRegistry, failure

router = APIRouter(prefix="/v1")
BENCODE = "text/plain"  # what trackers have always sent


@router.get("/tracker/{peer_token}/announce", tags=["nodes"], include_in_schema=False)
def announce(peer_token: str, request: Request) -> Response:
    side = getattr(request.app.state, "distribution", None)
    registry: TrackerRegistry | None = side.services.get(SERVICE) if side is not None else None
    if registry is None:
        return Response(failure("no running deployment has this tracker"), media_type=BENCODE)
    client = request.client.host if request.client else ""
    body = registry.announce(peer_token, request.scope.get("query_string", b""), client,
                             request.headers.get("host", ""))
    return Response(body, media_type=BENCODE, headers={"Cache-Control": "no-store"})
