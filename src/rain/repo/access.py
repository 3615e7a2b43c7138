"""Who may do what to an image. Reads are filtered in the catalog's queries;
these checks guard changes, and run only after the image was resolved through
the viewer's visibility (so an invisible image is already a 404)."""

from __future__ import annotations

from rain.model import Forbidden, Image, ImageStatus, Unauthorized, User

NODE_TOKEN_LIMITS = ("a node token only registers and reports its own node and reads the "
                     "images of running deployments sent to it")


def require_user(viewer: User | None) -> User:
    if viewer is None:
        raise Unauthorized("authentication required: pass a token (--token or RAIN_TOKEN)")
    refuse_node(viewer)
    return viewer


def refuse_node(viewer: User | None) -> None:
    """Node tokens act as their node, never as a user: every user action refuses them."""
    if viewer is not None and viewer.node is not None:
        raise Forbidden(f"this is node {viewer.node}'s token: {NODE_TOKEN_LIMITS}")


def require_agent(viewer: User | None, node: str | None = None) -> User:
    """An admin, or the node token of node `node` (of any node while `node` is None)."""
    if viewer is None or viewer.node is None:
        return require_admin(viewer)
    if node is not None and viewer.node != node:
        raise Forbidden(f"this is node {viewer.node}'s token: it cannot act as node {node}")
    return viewer


def require_admin(viewer: User | None) -> User:
    user = require_user(viewer)
    if not user.is_admin:
        raise Forbidden("only an admin may do this")
    return user


def can_modify(viewer: User | None, image: Image) -> bool:
    return viewer is not None and (viewer.is_admin or viewer.name == image.owner)


def require_modify(viewer: User | None, image: Image, what: str = "change") -> User:
    user = require_user(viewer)
    if not can_modify(user, image):
        raise Forbidden(f"only the owner or an admin may {what} image {image.id}")
    return user


def require_readable_data(viewer: User | None, image: Image) -> None:
    """Deactivated images keep their metadata visible but their data only for admins."""
    if image.status == ImageStatus.DEACTIVATED and not (viewer and viewer.is_admin):
        raise Forbidden(f"image {image.id} is deactivated; its data cannot be pulled")
