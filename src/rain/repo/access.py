"""Who may do what to an image. Reads are filtered in the catalog's queries;
these checks guard changes, and run only after the image was resolved through
the viewer's visibility (so an invisible image is already a 404)."""

from __future__ import annotations

from rain.model import Forbidden, Image, ImageStatus, Unauthorized, User


def require_user(viewer: User | None) -> User:
    if viewer is None:
        raise Unauthorized("authentication required: pass a token (--token or RAIN_TOKEN)")
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
