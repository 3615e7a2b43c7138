"""Debian's udpcast (`udp-sender`, `udp-receiver`), wrapped once: argv, stderr, statistics.

Quirks this module knows so that rain.distribute.methods.multicast.method does not:

* Rendezvous. By default udpcast finds its peers through the interface's
  broadcast address, and an address added without `brd` (the testbed's, many
  hand-made ones) has none: the receivers then never reach the sender. Both
  sides are therefore given an explicit multicast rendezvous group
  (`--mcast-rdv-address`), which also keeps deployments apart.
* `--interface` takes a name or one of the interface's addresses; no route
  is needed on either side (udpcast sets IP_MULTICAST_IF and joins the group
  on that interface), so nodes without a multicast route still work.
* Start. The sender checks its start condition only when `select` times out
  (2 s without `--rexmit-hello-interval`): a short hello interval both starts
  the transfer right after the last receiver connects and repeats the hello
  for receivers whose first connection request was lost.
* Statistics go to stderr, lines ended by `\\r`, numbers grouped with spaces:
  `bytes= 67 108 864  re-xmits=0000262 (  0.5%) slice=0112 -   2`. `bytes` is
  the payload acknowledged by every receiver, `re-xmits` counts re-sent blocks.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import shutil
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from rain.formats.tool import run_tool, running_tool
from rain.model.errors import ToolFailed

SENDER = "udp-sender"
RECEIVER = "udp-receiver"
BLOCK_SIZE = 1456  # udpcast's default and largest block: 1456 + 44 header bytes = a 1500 MTU
# Bytes on the wire per block besides its payload: udpcast's 16-byte header, UDP, IPv4
# and Ethernet. tbf counts whole frames, so a cap is set this much under a link's rate.
FRAME_OVERHEAD = 16 + 8 + 20 + 14

_STATS = re.compile(rb"bytes=\s*([\d ]+?)\s*re-xmits=\s*(\d+)")
_READY = b"Broadcasting control to"


def require(tool: str) -> str:
    """The tool's path, or the error run_tool would give for a missing tool."""
    path = shutil.which(tool)
    if path is None:
        raise ToolFailed(f"{tool} is not installed (not found on PATH; Debian package "
                         "'udpcast')", tool=tool)
    return path


# -- network facts -------------------------------------------------------------------------
def _ip_json(*args: str) -> list[dict[str, object]]:
    out = run_tool(["ip", "-j", *args], timeout=10).stdout
    try:
        data = json.loads(out or b"[]")
    except ValueError:
        raise ToolFailed(f"ip {' '.join(args)} printed no JSON", tool="ip") from None
    return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []


def local_interface(address: str) -> str | None:
    """Name of this namespace's interface that holds IPv4 `address`, or None."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        return None
    if ip.is_unspecified:
        return None
    for link in _ip_json("-4", "addr", "show"):
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if isinstance(info, dict) and info.get("local") == str(ip):
                return str(link.get("ifname"))
    return None


def route_interface(destination: str) -> tuple[str, str] | None:
    """(interface, source address) this namespace uses to reach `destination`, or None."""
    try:
        ipaddress.IPv4Address(destination)
    except ValueError:
        return None
    try:
        routes = _ip_json("-4", "route", "get", destination)
    except ToolFailed:
        return None  # no route at all ("Network is unreachable")
    for r in routes:
        if r.get("dev"):
            return str(r["dev"]), str(r.get("prefsrc") or "")
    return None


def interface_address(interface: str) -> str | None:
    """The first IPv4 address of `interface`."""
    for link in _ip_json("-4", "addr", "show", "dev", interface):
        infos = link.get("addr_info")
        for info in infos if isinstance(infos, list) else []:
            if isinstance(info, dict) and info.get("local"):
                return str(info["local"])
    return None


# -- argv --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Session:
    """What sender and receivers must agree on: ports, groups, interface side options."""

    portbase: int
    rdv_group: str  # rendezvous (control) multicast group
    data_group: str  # data multicast group (the receivers learn it from the sender)
    ttl: int = 1

    def common(self, interface: str) -> list[str]:
        return ["--nokbd", "--portbase", str(self.portbase), "--interface", interface,
                "--mcast-rdv-address", self.rdv_group, "--ttl", str(self.ttl)]


def sender_argv(tool: str, session: Session, interface: str, *, receivers: int,
                max_wait: float, min_wait: float, retries_until_drop: int,
                hello_interval_ms: int, start_timeout: float, max_bitrate: int | None,
                fec: str | None, blocksize: int = BLOCK_SIZE, slice_size: int | None = None,
                file: str | None = None) -> list[str]:
    """udp-sender reading the stream from `file`, or from its stdin."""
    argv = [tool, *session.common(interface), "--mcast-data-address", session.data_group,
            "--min-receivers", str(receivers), "--max-wait", str(max(1, round(max_wait))),
            "--retries-until-drop", str(retries_until_drop),
            "--rexmit-hello-interval", str(hello_interval_ms),
            "--start-timeout", str(max(1, round(start_timeout))),
            "--blocksize", str(blocksize)]
    if min_wait > 0:
        argv += ["--min-wait", str(max(1, round(min_wait)))]
    if max_bitrate:
        argv += ["--max-bitrate", str(int(max_bitrate))]
    if fec:
        argv += ["--fec", fec]
    if slice_size:
        argv += ["--default-slice-size", str(slice_size)]
    if file is not None:
        argv += ["--file", file]
    return argv


def receiver_argv(tool: str, session: Session, interface: str, *, start_timeout: float,
                  receive_timeout: float, exit_wait_ms: int = 500,
                  rcvbuf: int | None = None) -> list[str]:
    """udp-receiver writing the stream to its stdout."""
    argv = [tool, *session.common(interface),
            "--start-timeout", str(max(1, round(start_timeout))),
            "--receive-timeout", str(max(1, round(receive_timeout))),
            "--exit-wait", str(exit_wait_ms)]
    if rcvbuf:
        argv += ["--rcvbuf", str(rcvbuf)]
    return argv


def fec_overhead(fec: str | None) -> float:
    """Extra blocks per data block of a `--fec STRIPESxREDUNDANCY/STRIPESIZE` setting."""
    if not fec:
        return 0.0
    m = re.fullmatch(r"(\d+)x(\d+)(?:/(\d+))?", fec)
    if not m:
        raise ValueError(f"bad udpcast FEC setting {fec!r}: use e.g. 8x8/128")
    _stripes, redundancy, size = int(m[1]), int(m[2]), int(m[3] or 128)
    return redundancy / size


# -- running ---------------------------------------------------------------------------------
@dataclass
class SenderStats:
    acked_bytes: int = 0  # stream bytes every remaining receiver confirmed
    retransmitted_blocks: int = 0
    connected: int = 0
    dropped: int = 0


class StderrLog:
    """Reads a tool's stderr in a thread: keeps its tail, hands each line to `on_line`.

    udpcast ends its progress lines with a bare carriage return, so both `\\r` and
    `\\n` end a line here; the tail keeps only the other lines (the messages).
    """

    def __init__(self, stream: IO[bytes], on_line: Callable[[bytes], None] | None = None,
                 keep: int = 40) -> None:
        self._stream = stream
        self._on_line = on_line
        self._tail: deque[str] = deque(maxlen=keep)
        self._thread = threading.Thread(target=self._run, name="udpcast-stderr", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rest = b""
        with contextlib.suppress(OSError, ValueError):
            while block := self._stream.read1(65536):  # type: ignore[attr-defined]
                rest += block
                *lines, rest = re.split(rb"[\r\n]", rest)
                for line in lines:
                    self._line(line)
        if rest:
            self._line(rest)

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        if not line.startswith(b"bytes="):
            self._tail.append(line.decode("utf-8", "replace"))
        if self._on_line is not None:
            self._on_line(line)

    def join(self, timeout: float = 5.0) -> None:
        self._thread.join(timeout)

    @property
    def text(self) -> str:
        return "\n".join(self._tail)


class UdpSender:
    """A running udp-sender; `feed` (if given) writes the stream into its stdin."""

    def __init__(self, argv: Sequence[str],
                 feed: Callable[[IO[bytes]], None] | None = None) -> None:
        self.argv = list(argv)
        self.tool = self.argv[0].rsplit("/", 1)[-1]
        self.stats = SenderStats()
        self._feed = feed
        self._ready = threading.Event()
        self._stack = contextlib.ExitStack()
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: StderrLog | None = None
        self._feeder: threading.Thread | None = None
        self.feed_error: BaseException | None = None

    def _on_line(self, line: bytes) -> None:
        if m := _STATS.search(line):
            self.stats.acked_bytes = int(m[1].replace(b" ", b""))
            self.stats.retransmitted_blocks = int(m[2])
        elif line.startswith(_READY):
            self._ready.set()
        elif line.startswith(b"New connection from"):
            self.stats.connected += 1
        elif line.startswith(b"Dropping client"):
            self.stats.dropped += 1

    def start(self, ready_timeout: float = 10.0) -> None:
        """Start and wait until it listens for receivers; ToolFailed if it does not."""
        proc = self._stack.enter_context(running_tool(
            self.argv, stdin=subprocess.PIPE if self._feed else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        self._proc = proc
        assert proc.stderr is not None
        self._stderr = StderrLog(proc.stderr, self._on_line)
        deadline = time.monotonic() + ready_timeout
        while not self._ready.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                self._stderr.join(2)
                rc = proc.poll()
                self.stop()
                why = f"exited with status {rc}" if rc is not None else \
                    "did not start listening"
                raise ToolFailed(f"{self.tool} {why}: {stderr_line(self.stderr)}",
                                 tool=self.tool, stderr=self.stderr)
        if self._feed is not None:
            assert proc.stdin is not None
            self._feeder = threading.Thread(target=self._run_feed, args=(proc.stdin,),
                                            name="udp-sender-feed", daemon=True)
            self._feeder.start()

    def _run_feed(self, stdin: IO[bytes]) -> None:
        assert self._feed is not None
        try:
            self._feed(stdin)
            stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the sender stopped (done, every receiver dropped, or stopped by us)
        except BaseException as exc:
            self.feed_error = exc
            if self._proc is not None:
                with contextlib.suppress(OSError):
                    self._proc.kill()

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Kill it (its whole process group) if it still runs; idempotent."""
        self._stack.close()
        if self._feeder is not None:
            self._feeder.join(10)
        if self._stderr is not None:
            self._stderr.join(5)

    @property
    def stderr(self) -> str:
        return self._stderr.text if self._stderr is not None else ""


@contextlib.contextmanager
def udp_receiver(argv: Sequence[str]) -> Iterator[tuple[subprocess.Popen[bytes], StderrLog]]:
    """A running udp-receiver whose stdout is the stream; killed on leaving the block."""
    with running_tool(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None
        log = StderrLog(proc.stderr)
        try:
            yield proc, log
        finally:
            with contextlib.suppress(OSError):
                proc.kill()
    log.join(5)


def stderr_line(stderr: str) -> str:
    """The last message lines of a tool's stderr, on one line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()][-3:]
    return " / ".join(lines) if lines else "(no message)"

