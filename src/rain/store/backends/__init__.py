"""Storage backends; each implements `rain.store.backend.Backend`."""

from rain.store.backends.fs import FilesystemBackend

__all__ = ["FilesystemBackend"]
