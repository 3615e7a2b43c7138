"""The metadata catalog: images, users, groups, tokens, usage, build jobs, nodes,
deployments, instances and torrents; search and matchmaking."""

from __future__ import annotations

from rain.catalog.builds import BuildCatalog
from rain.catalog.db import Database
from rain.catalog.deployments import DeploymentCatalog
from rain.catalog.images import ImageCatalog, Variant
from rain.catalog.match import Match, MatchCatalog, MatchReport, Preference, Requirements
from rain.catalog.nodes import NodeCatalog
from rain.catalog.references import ReferenceCatalog, is_id_prefix, unique_prefix
from rain.catalog.search import ImageQuery
from rain.catalog.tokens import TokenCatalog
from rain.catalog.torrents import TorrentCatalog
from rain.catalog.usage import UsageCatalog
from rain.catalog.users import UserCatalog
from rain.catalog.versions import VersionConstraint, compare_versions


class Catalog(UserCatalog, TokenCatalog, ImageCatalog, ReferenceCatalog, MatchCatalog,
              UsageCatalog, BuildCatalog, NodeCatalog, DeploymentCatalog, TorrentCatalog):
    """One object over the database, assembled from one mixin per concern."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)

    def close(self) -> None:
        self.db.close()


__all__ = [
    "Catalog",
    "ImageQuery",
    "Match",
    "MatchReport",
    "Preference",
    "Requirements",
    "Variant",
    "VersionConstraint",
    "compare_versions",
    "is_id_prefix",
    "unique_prefix",
]
