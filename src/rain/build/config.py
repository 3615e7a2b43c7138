"""Build settings (`[build]` in rain.toml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BuildConfig:
    # Builds running at once in one server process; more wait in the queue.
    # (The FutureGrid paper saw builds slow down beyond two per node.)
    max_concurrent: int = 2
    # "module:function" that makes the build runner: function(repo, config) -> BuildRunner.
    # If the default module is not installed the server runs without builds (501).
    runner: str = "rain.build.builder:make_runner"
    # Seconds a client pulling a purged image is told to wait before retrying.
    retry_after: int = 10
    # A running build whose server has not reported for this long is marked failed.
    stale_after_seconds: float = 300.0
    # Log kept per build, in characters; the rest is dropped (with a note).
    max_log_chars: int = 4 * 1024 * 1024
    # How often a server looks for builds queued by another server sharing the catalog.
    poll_seconds: float = 2.0
    # Boot every new image in QEMU (no network) before storing it; a failed boot fails the build.
    boot_test: bool = True
    # Seconds the boot test waits for the image's boot marker (TCG is slow).
    boot_timeout: float = 180.0
    # QEMU accelerator of boot tests: "auto" (KVM when a probe shows it boots guests, TCG
    # otherwise, and TCG for good once KVM fails a real boot), "kvm" or "tcg".
    accel: str = "auto"
    # Keyring the mirror's InRelease must be signed with (packages are fetched on the host).
    keyring: str = "/usr/share/keyrings/debian-archive-keyring.gpg"
    # Most bytes of .debs one package step may download (a template cannot ask for the archive).
    max_download_bytes: int = 4 * 1024**3
