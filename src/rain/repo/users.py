"""Administration of users and groups: list, disable, delete; groups and members.

All of it is for admins (a user may look at themselves). An admin cannot
disable or delete themselves, so a repository is never left without the
admin who was using it by a slip of the keyboard. A deleted user is kept as
a tombstone (rain.catalog.users): it must own no image that is not deleted,
or its images go to another user with `transfer_to`.
"""

from __future__ import annotations

from rain.catalog import Catalog
from rain.model import Forbidden, Group, InvalidRequest, User
from rain.repo.access import require_admin, require_user


class UserAdmin:
    """`Repository.users`: what the user and group routes may do, each call checked."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def list_users(self, viewer: User | None, *, include_deleted: bool = False) -> list[User]:
        require_admin(viewer)
        return self.catalog.list_users(include_deleted=include_deleted)

    def show_user(self, viewer: User | None, name: str) -> User:
        me = require_user(viewer)
        if name != me.name:
            require_admin(me)
        return self.catalog.get_user(name)

    def set_user_disabled(self, viewer: User | None, name: str, disabled: bool) -> User:
        """Disable (every token of the user answers 401 at once) or enable a user."""
        _not_yourself(require_admin(viewer), name, "disable" if disabled else "enable")
        return self.catalog.set_user_disabled(name, disabled)

    def delete_user(self, viewer: User | None, name: str, *,
                    transfer_to: str | None = None) -> tuple[User, int]:
        """Delete a user; (the tombstone, images given to `transfer_to`)."""
        _not_yourself(require_admin(viewer), name, "delete")
        return self.catalog.delete_user(name, transfer_to=transfer_to or None)

    # -- groups -------------------------------------------------------------------
    def list_groups(self, viewer: User | None) -> list[Group]:
        require_admin(viewer)
        return self.catalog.list_groups()

    def show_group(self, viewer: User | None, name: str) -> Group:
        require_admin(viewer)
        return self.catalog.get_group(name)

    def create_group(self, viewer: User | None, name: str) -> Group:
        require_admin(viewer)
        return self.catalog.create_group(name)

    def delete_group(self, viewer: User | None, name: str) -> Group:
        """Delete a group; images shared with it are no longer shared with its members."""
        require_admin(viewer)
        return self.catalog.delete_group(name)

    def add_group_members(self, viewer: User | None, group: str, users: list[str]) -> Group:
        require_admin(viewer)
        if not users:
            raise InvalidRequest("name at least one user to add")
        return self.catalog.add_group_members(group, users)

    def remove_group_members(self, viewer: User | None, group: str,
                             users: list[str]) -> Group:
        require_admin(viewer)
        if not users:
            raise InvalidRequest("name at least one user to remove")
        return self.catalog.remove_group_members(group, users)


def _not_yourself(me: User, name: str, what: str) -> None:
    if me.name == name:
        raise Forbidden(f"you cannot {what} yourself: ask another admin")
