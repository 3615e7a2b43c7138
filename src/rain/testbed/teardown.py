"""Removing a testbed, from its name alone.

`down` must work after `up` crashed half way, after the state file was lost
and when it runs twice, so it trusts nothing but the kernel: every namespace
called `rain-NAME-*` and the host link `rain-NAME` belong to testbed NAME.
Processes are found by the namespace they live in, never by a remembered pid
(which may since belong to someone else).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field

from rain.model.errors import RainError
from rain.testbed import iproute
from rain.testbed.plan import NAME_RE, PREFIX, host_link_name, namespace_prefix

TERM_GRACE = 5.0  # seconds for processes to exit after SIGTERM, before SIGKILL
_POLL = 0.05


@dataclass
class Removed:
    """What `destroy` found and removed."""

    namespaces: list[str] = field(default_factory=list)
    processes: int = 0
    host_link: bool = False

    @property
    def anything(self) -> bool:
        return bool(self.namespaces or self.processes or self.host_link)

    def to_dict(self) -> dict[str, object]:
        return {"namespaces": self.namespaces, "processes": self.processes,
                "host_link": self.host_link}


def existing_testbeds() -> dict[str, list[str]]:
    """Every testbed that has a namespace or a host link on this machine, by name."""
    found: dict[str, list[str]] = {}
    for ns in iproute.netns_list():
        parts = ns.split("-")
        if len(parts) == 3 and parts[0] == PREFIX and NAME_RE.fullmatch(parts[1]):
            found.setdefault(parts[1], []).append(ns)
    for link in iproute.link_names():
        parts = link.split("-")
        if len(parts) == 2 and parts[0] == PREFIX and NAME_RE.fullmatch(parts[1]):
            found.setdefault(parts[1], [])
    return {name: sorted(found[name]) for name in sorted(found)}


def namespaces_of(name: str) -> list[str]:
    prefix = namespace_prefix(name)
    return sorted(ns for ns in iproute.netns_list() if ns.startswith(prefix))


def kill_namespace_processes(namespaces: list[str], sig: int = signal.SIGTERM,
                             grace: float = TERM_GRACE) -> int:
    """Signal every process in the namespaces; SIGKILL what is left after `grace`.

    Returns how many processes were found. Waits until none is left (zombies
    of this process's own children do not count: they are no longer in any
    namespace).
    """
    pids = _all_pids(namespaces)
    found = len(pids)
    for pid in pids:
        _signal(pid, sig)
    deadline = time.monotonic() + (grace if sig != signal.SIGKILL else 0)
    while pids and time.monotonic() < deadline:
        time.sleep(_POLL)
        pids = _all_pids(namespaces)
    for _ in range(3):  # late forks are killed in the next round
        if not pids:
            break
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(_POLL)
            pids = _all_pids(namespaces)
    return found


def destroy(name: str) -> Removed:
    """Kill all processes of testbed `name`, delete its namespaces and host link."""
    removed = Removed()
    removed.namespaces = namespaces_of(name)
    link = host_link_name(name)
    removed.host_link = link in iproute.link_names()
    removed.processes = kill_namespace_processes(removed.namespaces)
    for ns in removed.namespaces:
        iproute.netns_delete(ns)
    # Deleting the switch namespace destroys the host link's peer and so the
    # link itself; an `up` that crashed before creating the switch may not have.
    if removed.host_link and link in iproute.link_names():
        iproute.link_delete(link)
    left = namespaces_of(name)
    if left:
        raise RainError(f"could not delete namespaces {', '.join(left)}")
    return removed


def _all_pids(namespaces: list[str]) -> list[int]:
    me = os.getpid()
    return [pid for pids in iproute.netns_pids(namespaces).values() for pid in pids if pid != me]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
