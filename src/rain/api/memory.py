"""The server's memory: glibc malloc settings for many concurrent streams, and giving back.

Forty concurrent transfers once took the server to 738 MB RSS, and it stayed
at 471 MB when idle (docs/benchmarks.md): upload buffers kept in a pool far
larger than one upload needs, and freed chunk buffers scattered over up to
8 × cores malloc arenas that glibc never returns (and a SQLite connection per
finished HTTP connection, rain.store.index). Now upload buffers share one
budget (rain.store.stream.BlockPool), the arenas are few, and when no
transfer has run for a second the idle buffers are unmapped and the free
memory of every arena goes back to the kernel (`malloc_trim`).
"""

from __future__ import annotations

import ctypes
import functools

from rain.store.stream import BLOCKS

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
ARENAS = 2


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def tune_malloc() -> None:
    """Keep freed memory for reuse while transfers run, in few arenas.

    Chunk buffers (256 KiB) come and go by the thousand per second; with
    glibc's defaults each can be a fresh mmap or a re-grown heap, i.e. page
    faults on every byte — expensive in a VM — so they stay on the heap
    (mmap threshold 32 MiB) and freed heap tops are kept (trim threshold
    64 MiB); `release_memory` gives it all back once idle. Python allocates
    under the GIL, so more arenas buy little concurrency and much fragmentation.
    """
    libc = _libc()
    if libc is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024)
    libc.mallopt(M_TRIM_THRESHOLD, 64 * 1024 * 1024)
    libc.mallopt(M_ARENA_MAX, ARENAS)


def release_memory() -> None:
    """The server is idle: unmap the idle upload buffers and return the free heap memory
    of every arena to the kernel."""
    BLOCKS.release_idle()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
