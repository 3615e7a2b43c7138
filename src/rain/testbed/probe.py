"""Measuring what the shaped links really carry (TCP, with plain Python sockets).

Benchmarks judge transfer methods against a lower bound computed from the
configured rate, so the testbed's own accuracy is measured, not assumed:
`measure_tcp` runs one TCP stream per (sender, receiver) pair, all at once,
and reports what each receiver got.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from rain.testbed.testbed import Testbed

WARMUP = 0.5  # seconds left out of `steady_bps` (slow start, the bucket's first burst)
START_DELAY = 1.5  # seconds from now to the common start of all senders

_RECEIVER = """
import json, socket, sys, time
addr, port, timeout, warm = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((addr, port)); s.listen(1); s.settimeout(timeout)
c, _ = s.accept(); c.settimeout(timeout)
buf = bytearray(1 << 20); n = 0; first = last = None; warm_at = None; warm_n = 0
while True:
    k = c.recv_into(buf)
    if not k:
        break
    now = time.monotonic()
    if first is None:
        first = now
    n += k; last = now
    if warm_at is None and now - first >= warm:
        warm_at, warm_n = now, n
print(json.dumps({"bytes": n, "seconds": (last or 0) - (first or 0),
                  "steady_bytes": n - warm_n,
                  "steady_seconds": (last - warm_at) if warm_at else 0.0}))
"""

_SENDER = """
import socket, sys, time
addr, port, start, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + 10
while True:
    try:
        c = socket.create_connection((addr, port), timeout=5); break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.05)
time.sleep(max(0.0, start - time.time()))
buf = b"\\0" * (64 << 10); end = start + seconds
while time.time() < end:
    c.sendall(buf)
c.shutdown(socket.SHUT_WR); c.recv(1); c.close()
"""


@dataclass(frozen=True)
class Throughput:
    """What one receiver got: all of it, and the part after the warm-up."""

    src: str
    dst: str
    bytes: int
    seconds: float
    steady_bytes: int
    steady_seconds: float

    @property
    def bps(self) -> float:
        """Bits/s over the whole transfer, first byte to last."""
        return self.bytes * 8 / self.seconds if self.seconds else 0.0

    @property
    def steady_bps(self) -> float:
        """Bits/s after the first WARMUP seconds."""
        return self.steady_bytes * 8 / self.steady_seconds if self.steady_seconds else 0.0


def measure_tcp(tb: Testbed, pairs: Sequence[tuple[str, str]], seconds: float = 3.0,
                port: int = 5201) -> list[Throughput]:
    """Send from each `src` to each `dst` (node names or "repo") for `seconds`, concurrently.

    All senders start at the same moment (after `START_DELAY`, enough for
    the interpreters to start) and stop at the same moment, so the rates of
    concurrent flows are comparable.
    """
    py = sys.executable
    timeout = seconds + START_DELAY + 30
    start = time.time() + START_DELAY
    with ThreadPoolExecutor(max_workers=2 * len(pairs)) as pool:
        receivers = []
        for i, (_, dst) in enumerate(pairs):
            argv = [py, "-c", _RECEIVER, tb.node(dst).address, str(port + i), str(timeout),
                    str(WARMUP)]
            receivers.append(pool.submit(tb.exec, dst, argv, timeout=timeout))
        senders = []
        for i, (src, dst) in enumerate(pairs):
            argv = [py, "-c", _SENDER, tb.node(dst).address, str(port + i), f"{start:.3f}",
                    str(seconds)]
            senders.append(pool.submit(tb.exec, src, argv, timeout=timeout))
        for f in senders:
            f.result()
        results = []
        for (src, dst), f in zip(pairs, receivers, strict=True):
            got = json.loads(f.result().stdout)
            results.append(Throughput(src, dst, got["bytes"], got["seconds"],
                                      got["steady_bytes"], got["steady_seconds"]))
    return results
