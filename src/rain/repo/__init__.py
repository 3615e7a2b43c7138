"""The repository service: push, pull, share, search, usage, purge; enforces permissions."""

from rain.repo.config import RepoConfig
from rain.repo.service import Download, Repository

__all__ = ["Download", "RepoConfig", "Repository"]
