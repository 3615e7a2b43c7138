"""A budget for reading untrusted structures: bytes, reads and CPU, checked on every read.

Everything that walks a stranger's disk (partition tables, qcow2 tables,
ext4 metadata, dpkg's status file) reads through one `ReadBudget`, so a
hostile image can make detection fail but never make it cost more than the
budget: a loop of extents, a directory of a million entries or a chain of
symlinks runs out of bytes, reads or CPU seconds and stops with one error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rain.model.errors import InvalidImage

MiB = 1 << 20


class BudgetExceeded(InvalidImage):
    """Reading an image's contents would cost more than its budget."""

    code = "budget_exceeded"


@dataclass
class ReadBudget:
    """What one detection may spend. `charge` before each read; `spent_*` says what it did."""

    max_bytes: int = 64 * MiB
    max_reads: int = 20_000
    cpu_seconds: float = 5.0
    spent_bytes: int = 0
    spent_reads: int = 0
    _cpu_start: float = field(default_factory=time.thread_time)

    def charge(self, nbytes: int) -> None:
        """Account for a read of `nbytes`; refuse it when the budget would be exceeded."""
        if nbytes < 0:
            raise InvalidImage(f"a negative read of {nbytes} bytes")
        self.spent_bytes += nbytes
        self.spent_reads += 1
        if self.spent_bytes > self.max_bytes:
            raise BudgetExceeded(f"reading the image would take more than {self.max_bytes} bytes")
        if self.spent_reads > self.max_reads:
            raise BudgetExceeded(f"reading the image would take more than {self.max_reads} reads")
        self.check_cpu()

    def check_cpu(self) -> None:
        """Refuse once this thread has spent its CPU seconds (also called from parsing loops)."""
        if self.cpu_spent > self.cpu_seconds:
            raise BudgetExceeded(
                f"reading the image took more than {self.cpu_seconds:g} s of CPU")

    @property
    def cpu_spent(self) -> float:
        return time.thread_time() - self._cpu_start


ReadAt = Callable[[int, int], bytes]


class BoundedReader:
    """`read(offset, length)` over a source of `size` bytes; every read checked and charged.

    A read that starts past the end, is negative, or is larger than `max_read`
    is refused (a header field asked for it); a read that runs past the end
    comes back short, like pread.
    """

    def __init__(self, read_at: ReadAt, size: int, budget: ReadBudget,
                 *, max_read: int = 16 * MiB) -> None:
        self._read_at = read_at
        self.size = size
        self.budget = budget
        self.max_read = max_read

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidImage(f"a read at {offset} of {length} bytes")
        if length > self.max_read:
            raise InvalidImage(f"a read of {length} bytes is larger than {self.max_read}")
        if offset >= self.size or length == 0:
            return b""
        length = min(length, self.size - offset)
        self.budget.charge(length)
        return self._read_at(offset, length)

    def read_exact(self, offset: int, length: int, what: str) -> bytes:
        """Like `read`, but the whole range must be inside the source."""
        data = self.read(offset, length)
        if len(data) != length:
            raise InvalidImage(f"{what} at {offset} lies past the end of the disk")
        return data
