"""Every testbed host's TCP congestion control, on any kernel of this kind.

Results must not depend on the machine's own default (bbr on some VMs, cubic
on a stock Debian kernel: bbr was 6-9 % slower in 24-node swarms, see
docs/bittorrent.md), so the testbed pins one algorithm in every host's
namespace. Two kernel rules shape how:

- a new network namespace starts with the machine's default
  (``net.ipv4.tcp_congestion_control`` of the initial namespace);
- only the initial namespace may choose an algorithm that is *available* but
  not *allowed* (``net.ipv4.tcp_allowed_congestion_control``): inside any
  other namespace that sysctl is refused with EPERM. Some machines allow only
  ``reno bbr`` while cubic is built in.

So `choose` takes the requested algorithm as it is when the machine's default
is it or it is allowed; when it is available but not allowed, it adds it to
the allowed list (root only: a host-wide setting that only widens what
unprivileged sockets and namespaces may pick) and says so, keeping the
original list in `RECORD` so that `restore_allowed` puts it back once the
last testbed on the machine is down. Without an explicit request, a kernel
that lacks cubic leaves every host at the machine's default, with a warning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rain.model.errors import InvalidRequest

DEFAULT = "cubic"
SYSCTL = Path("/proc/sys/net/ipv4")
ALLOWED_KEY = "net.ipv4.tcp_allowed_congestion_control"


@dataclass(frozen=True)
class Congestion:
    """What every host of a testbed runs, and how it came to be."""

    name: str
    # Whether each host's namespace sets it; False when the namespaces inherit it.
    set_in_hosts: bool
    # One line for `up`, the state file and benchmark headers ("" when nothing unusual).
    note: str = ""


def _read(name: str) -> list[str]:
    try:
        return (SYSCTL / name).read_text().split()
    except OSError:
        return []


def check(requested: str | None) -> None:
    """Refuse, before anything is made, an algorithm this kernel does not have."""
    if requested is None:
        return
    available = _read("tcp_available_congestion_control")
    if requested not in available:
        raise InvalidRequest(f"bad congestion control {requested!r}: this kernel has "
                             f"{', '.join(available) or 'none listed'}")


def choose(requested: str | None, record: Path) -> Congestion:
    """The algorithm for every host (call under the testbed creation lock)."""
    check(requested)
    want = requested or DEFAULT
    default = (_read("tcp_congestion_control") or ["?"])[0]
    available = _read("tcp_available_congestion_control")
    if want not in available:  # only the implicit default can get here
        return Congestion(default, False,
                          f"{want} is not available on this kernel (it has "
                          f"{', '.join(available) or 'none listed'}); every host keeps the "
                          f"machine's default, {default}")
    if want == default:
        return Congestion(want, False)
    allowed = _read("tcp_allowed_congestion_control")
    if want in allowed:
        return Congestion(want, True)
    if os.geteuid() != 0:
        if requested is not None:
            raise InvalidRequest(f"congestion control {want!r} is not in {ALLOWED_KEY} "
                                 f"({' '.join(allowed)}) and only root may add it")
        return Congestion(default, False,
                          f"{want} is not in {ALLOWED_KEY} and only root may add it; every "
                          f"host keeps the machine's default, {default}")
    if not record.exists():
        record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        record.write_text(" ".join(allowed) + "\n")
    (SYSCTL / "tcp_allowed_congestion_control").write_text(" ".join([*allowed, want]))
    return Congestion(want, True,
                      f"added {want} to {ALLOWED_KEY} (was: {' '.join(allowed)}) so that "
                      "namespaces may choose it; restored when the last testbed is down")


def restore_allowed(record: Path) -> str | None:
    """Put back the allowed list `choose` widened (when no testbed is left); returns it."""
    try:
        original = record.read_text().split()
    except FileNotFoundError:
        return None
    (SYSCTL / "tcp_allowed_congestion_control").write_text(" ".join(original))
    record.unlink()
    return " ".join(original)
