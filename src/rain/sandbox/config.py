"""Sandbox settings (`[sandbox]` in rain.toml): the id range and the limits of one command."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024**2
GiB = 1024**3


@dataclass
class SandboxConfig:
    # Host uid/gid that the sandbox's root (id 0) maps to; ids 0..id_count-1 inside map to
    # id_base.. on the host. Pick a range no host user or /etc/subuid entry uses (checked).
    # The default sits just above systemd-nspawn's container range.
    id_base: int = 0x70000000
    id_count: int = 65536
    # Per command: memory (incl. tmpfs pages) in bytes, processes/threads, CPU cores of
    # bandwidth (0: no CPU cap), wall-clock seconds before it is killed.
    memory_bytes: int = 2 * GiB
    processes: int = 1024
    cpus: float = 1.0
    timeout: float = 1800.0
    # Size of each tmpfs the sandbox gets (/run, /dev/shm); /dev has 1 MiB.
    tmpfs_bytes: int = 256 * MiB
