"""Tokens (list, create, revoke) and what a node token may read.

A user manages their own tokens; an admin anyone's, and issues node tokens:
the credential a node agent runs with. A node token is bound to one node
name. It registers and reports that node (rain.deploy.nodes) and reads an
image only through a grant: a running deployment (or prefetch) of exactly
that image that targets exactly that node, named by the request's
`X-Rain-Deployment`. The read then happens as the deployment's owner, who
was checked when they deployed, so a node token never reads an image no
deployment sent to its node.
"""

from __future__ import annotations

from rain.catalog import Catalog
from rain.model import ApiToken, DeploymentStatus, Forbidden, NotFound, User
from rain.model.node import check_node_name
from rain.repo.access import require_admin, require_user


class TokenAdmin:
    """`Repository.tokens`: what the token routes may do, each call checked."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def list_tokens(self, viewer: User | None, *, user: str | None = None,
                    node: str | None = None, everyone: bool = False) -> list[ApiToken]:
        """Your tokens; an admin: `user`'s, node `node`'s or everyone's."""
        me = require_user(viewer)
        if node is not None or everyone or (user is not None and user != me.name):
            require_admin(me)
        if node is not None:
            return self.catalog.list_tokens(node=check_node_name(node))
        return self.catalog.list_tokens(user=None if everyone else user or me.name,
                                        everyone=everyone)

    def create_token(self, viewer: User | None, *, label: str = "", user: str | None = None,
                     node: str | None = None) -> tuple[ApiToken, str]:
        """A new token for you (an admin: for `user`, or a node token for `node`)."""
        me = require_user(viewer)
        if node is not None:
            require_admin(me)
            return self.catalog.create_token(node=check_node_name(node), label=label)
        if user is not None and user != me.name:
            require_admin(me)
        return self.catalog.create_token(user=user or me.name, label=label)

    def revoke_token(self, viewer: User | None, token_id: int) -> ApiToken:
        """Revoke one of your tokens (an admin: any token); others' are NotFound."""
        me = require_user(viewer)
        token = self.catalog.get_token(token_id)
        if not me.is_admin and token.user != me.name:
            raise NotFound(f"no token {token_id}")
        return self.catalog.revoke_token(token_id)

class Credentials:
    """Mixed into `Repository` (which provides what is declared here)."""

    catalog: Catalog

    def node_reader(self, viewer: User | None, ref: str, deployment_id: str | None) -> User | None:
        """Who reads image `ref` for this request: the viewer itself, except for a node
        token, which reads as the owner of the running deployment that sent the image
        to its node (or is refused)."""
        if viewer is None or viewer.node is None:
            return viewer
        node = viewer.node
        refused = Forbidden(f"node {node}'s token reads only the images of running "
                            f"deployments sent to node {node}, and {ref} is not one of them"
                            + ("" if deployment_id else " (no X-Rain-Deployment header)"))
        if not deployment_id:
            raise refused
        try:
            deployment = self.catalog.get_deployment(deployment_id)
            owner = self.catalog.get_user(deployment.owner)
        except NotFound:
            raise refused from None
        if deployment.status != DeploymentStatus.RUNNING or deployment.image_id != ref \
                or node not in deployment.nodes or owner.disabled:
            raise refused
        return owner
