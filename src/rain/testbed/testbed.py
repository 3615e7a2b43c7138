"""A small cluster on one machine: network namespaces joined by a bridge, links shaped by tc.

`Testbed(...).up()` creates a switch namespace holding a bridge, one
namespace for the repository and one per node, each with a link to the
switch that is rate-limited in both directions, plus an unshaped host link
so that the host reaches every address (`rain.testbed.network`). Then it
starts `rain serve` in the repository's namespace and, unless told not to,
`rain agent` in each node's (`rain.testbed.services`).

`down()` (or `rain testbed down`) removes all of it from the testbed's name
alone; see `rain.testbed.teardown`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from rain.model.errors import Forbidden, InvalidRequest, NotFound
from rain.model.units import format_bits_per_second
from rain.testbed import congestion as tcp
from rain.testbed import iproute, network, services, teardown
from rain.testbed.plan import (
    Host,
    Plan,
    check_link_delay,
    check_link_rate,
    check_name,
    check_nodes,
    host_link_name,
    make_plan,
    slot_network,
)

DEFAULT_NAME = "tb"
DEFAULT_ROOT = Path("/var/tmp/rain-testbed")
STATE_FILE = "testbed.json"
# /run is cleared at boot, as namespaces are: what is here describes what exists.
RUN_DIR = Path("/run/rain-testbed")
LOCK_FILE = RUN_DIR / "lock"  # serialises the choice of names and slots
# The allowed congestion controls before a testbed widened them (rain.testbed.congestion).
CONGESTION_RECORD = RUN_DIR / "tcp_allowed_congestion_control"


def default_data_dir(name: str) -> Path:
    return DEFAULT_ROOT / name


def find_data_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The data directory of testbed `name`: as given, as `up` recorded it, or the default."""
    if data_dir:
        return Path(data_dir)
    try:
        return Path(_pointer(name).read_text().strip())
    except FileNotFoundError:
        return default_data_dir(name)


def _pointer(name: str) -> Path:
    return RUN_DIR / f"{name}.dir"


@dataclass(frozen=True)
class LinkBytes:
    """Byte counters of one namespace's end of its link (rx = downloaded, tx = uploaded)."""

    rx: int
    tx: int


class Testbed:
    """One testbed: its plan, its processes and the operations tests and benchmarks need."""

    __test__ = False  # not a pytest test class, whatever its name

    def __init__(self, name: str = DEFAULT_NAME, nodes: int = 3, rate: str | int = "1gbit",
                 data_dir: str | Path | None = None, *, repo_rate: str | int | None = None,
                 latency: str | None = None, mtu: int = 1500, congestion: str | None = None,
                 cache_size: str = "8G",
                 capacity: int = 8,
                 agents: bool = True, server_args: Sequence[str] = (),
                 agent_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 slot: int | None = None, timeout: float = 60.0) -> None:
        self.name = check_name(name)
        self.node_count = check_nodes(nodes)
        self.rate = check_link_rate(rate)
        self.repo_rate = check_link_rate(repo_rate) if repo_rate is not None else self.rate
        self.latency = check_link_delay(latency) if latency else None
        if not 576 <= mtu <= 65535:
            raise InvalidRequest(f"bad mtu {mtu}: use 576 to 65535 (9000: jumbo frames)")
        self.mtu = mtu
        tcp.check(congestion)
        self.congestion_request = congestion  # None: cubic, or the machine's default
        self.congestion: tcp.Congestion | None = None  # chosen by up()
        if capacity < 1:
            raise InvalidRequest(f"bad capacity {capacity}: must be at least 1")
        if slot is not None:
            slot_network(slot)  # validates
        self.data_dir = Path(data_dir or default_data_dir(name)).absolute()
        self.cache_size = cache_size
        self.capacity = capacity
        self.agents = agents
        self.server_args = list(server_args)
        self.agent_args = list(agent_args)
        self.env = dict(env or {})
        self.slot = slot
        self.timeout = timeout
        self.plan: Plan | None = None
        self.token = ""
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- what tests and benchmarks read --------------------------------------------
    @property
    def url(self) -> str:
        return self._plan.url

    @property
    def repo(self) -> Host:
        return self._plan.repo

    @property
    def nodes(self) -> tuple[Host, ...]:
        return self._plan.nodes

    @property
    def state_file(self) -> Path:
        return self.data_dir / STATE_FILE

    def node(self, name: str) -> Host:
        """A node (or "repo") by name or namespace."""
        return self._plan.host(name)

    @property
    def _plan(self) -> Plan:
        if self.plan is None:
            raise InvalidRequest(f"testbed {self.name} is not up")
        return self.plan

    # -- life cycle -----------------------------------------------------------------
    def up(self) -> Testbed:
        """Create the network, start the repository (and agents); undo it all on failure."""
        if os.geteuid() != 0:
            raise Forbidden("the testbed needs root (it creates network namespaces)")
        made_dir = not self.data_dir.exists()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with network.creation_lock(LOCK_FILE):
                # From here on, everything called rain-NAME-* is ours to remove.
                self.plan = network.claim(self.name, self.node_count, self.slot)
                try:
                    self.congestion = tcp.choose(self.congestion_request, CONGESTION_RECORD)
                    self._write_state("creating")
                    network.build(self.plan, self.rate, self.repo_rate, self.latency, self.mtu,
                                  self.congestion)
                except BaseException:
                    self.down()
                    raise
            self._start_server()
            if self.agents:
                self.start_agents()
            self._write_state("up")
        except BaseException:
            if self.plan is not None:
                self.down()
            if made_dir:
                with contextlib.suppress(OSError):
                    self.data_dir.rmdir()  # only when empty: logs stay for the post-mortem
            raise
        return self

    def down(self, *, purge: bool = False) -> teardown.Removed:
        """Remove everything of this testbed's name (also what a crashed `up` left)."""
        removed = down(self.name, self.data_dir, purge=purge)
        self._reap()
        self.plan = None
        return removed

    def __enter__(self) -> Testbed:
        return self if self.plan is not None else self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    @classmethod
    def attach(cls, name: str = DEFAULT_NAME, data_dir: str | Path | None = None) -> Testbed:
        """The testbed another process brought up, from its state file."""
        path = find_data_dir(name, data_dir) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise NotFound(f"no testbed state in {path}") from None
        tb = cls(state["name"], len(state["nodes"]), state["rate_bps"], state["data_dir"],
                 repo_rate=state["repo_rate_bps"], latency=state.get("latency"),
                 mtu=int(state.get("mtu", 1500)),
                 congestion=state.get("congestion"), cache_size=state["cache_size"],
                 capacity=state["capacity"],
                 agents=state["agents"], server_args=state["server_args"],
                 agent_args=state["agent_args"], slot=state["slot"])
        tb.plan = make_plan(tb.name, tb.node_count, state["slot"])
        if state.get("congestion"):
            tb.congestion = tcp.Congestion(state["congestion"], True,
                                           state.get("congestion_note", ""))
        tb.token = state["token"]
        tb.pids = {k: int(v) for k, v in state["pids"].items()}
        return tb

    def describe(self) -> dict[str, Any]:
        """What `up --json` prints and the state file holds."""
        plan = self._plan
        return {
            "name": self.name, "url": plan.url, "token": self.token, "slot": plan.slot,
            "network": f"{plan.network}", "host_address": plan.host_address,
            "host_link": plan.host_link, "switch": plan.switch,
            "rate": format_bits_per_second(self.rate), "rate_bps": self.rate,
            "repo_rate": format_bits_per_second(self.repo_rate), "repo_rate_bps": self.repo_rate,
            "latency": f"{self.latency * 1e3:g}ms" if self.latency else None,
            "mtu": self.mtu,
            "congestion": self.congestion.name if self.congestion else self.congestion_request,
            "congestion_note": self.congestion.note if self.congestion else "",
            "repo": _host_dict(plan.repo),
            "nodes": [_host_dict(n) for n in plan.nodes],
            "data_dir": str(self.data_dir), "cache_size": self.cache_size,
            "capacity": self.capacity, "agents": self.agents,
            "server_args": self.server_args, "agent_args": self.agent_args,
            "pids": dict(self.pids),
        }

    # -- processes --------------------------------------------------------------------
    def start_agents(self, nodes: Sequence[str] | None = None) -> None:
        """Start `rain agent` in the given nodes (all by default) and wait until registered."""
        hosts = [self.node(n) for n in nodes] if nodes is not None else list(self.nodes)
        started = datetime.now(UTC)
        agents = []
        for host in hosts:
            node_dir = self.data_dir / host.name
            # Each agent gets its own node token, as on real compute nodes: the admin
            # token stays with the repository (and whoever runs the testbed).
            token = services.node_token(self.url, self.token, host.name)
            argv = services.agent_argv(host, self.url, token, node_dir / "cache",
                                       self.cache_size, self.capacity, self.agent_args)
            log = node_dir / "agent.log"
            proc = services.start(host, argv, log, services.child_env(self.env))
            self._track(host.name, proc)
            agents.append(services.Started(host, proc, log))
        self._write_state("starting agents")
        services.wait_for_agents(self.url, self.token, agents, started, self.timeout)
        self.agents = True

    def kill_agent(self, node: str, sig: int = signal.SIGKILL) -> int:
        """Kill everything running in a node's namespace (its agent and what it started).

        This is how tests make a node fail mid-deployment. Returns how many
        processes were signalled.
        """
        host = self.node(node)
        count = teardown.kill_namespace_processes([host.namespace], sig=sig)
        self.pids.pop(host.name, None)
        proc = self._procs.pop(host.name, None)
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        return count

    def exec(self, node: str, argv: Sequence[str], *, timeout: float = 60.0,
             check: bool = True, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """Run a command in a node's (or "repo"'s) namespace and wait for it."""
        return iproute.exec_in(self.node(node).namespace, argv, timeout=timeout, check=check,
                           input=input, env=services.child_env(self.env))

    def spawn(self, node: str, argv: Sequence[str],
              log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a background command in a node's namespace (killed by `down` at the latest)."""
        return iproute.spawn_in(self.node(node).namespace, argv, log=log,
                            env=services.child_env(self.env))

    def interface_bytes(self, node: str) -> LinkBytes:
        """Bytes received and sent by a node (or "repo") on its link: the ground truth."""
        rx, tx = iproute.link_bytes(self.node(node).namespace, Plan.IFACE)
        return LinkBytes(rx=rx, tx=tx)

    # -- building ---------------------------------------------------------------------
    def _start_server(self) -> None:
        repo_dir = self.data_dir / "repo"
        log = repo_dir / "server.log"
        argv = services.server_argv(self.repo, repo_dir, self.server_args)
        proc = services.start(self.repo, argv, log, services.child_env(self.env))
        self._track("repo", proc)
        self._write_state("starting repository")
        services.wait_for_server(self.url, proc, log, self.timeout)
        try:
            self.token = (repo_dir / "admin.token").read_text().strip()
        except FileNotFoundError:
            raise NotFound(f"the repository in {repo_dir} has no admin.token (it is written "
                           "on the first start only): remove the directory or restore the "
                           "file") from None

    def _track(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        old = self._procs.get(name)
        if old is not None:
            old.poll()
        self._procs[name] = proc
        self.pids[name] = proc.pid

    def _reap(self) -> None:
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()
        self.pids.clear()

    def _write_state(self, status: str) -> None:
        state = {"status": status, "updated": datetime.now(UTC).isoformat(), **self.describe()}
        tmp = self.state_file.with_suffix(".tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        # 0600 from the start: it holds the admin token.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(json.dumps(state, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.state_file)
        RUN_DIR.mkdir(mode=0o700, exist_ok=True)
        _pointer(self.name).write_text(f"{self.data_dir}\n")


def down(name: str, data_dir: str | Path | None = None, *,
         purge: bool = False) -> teardown.Removed:
    """Remove testbed `name` (state file or not) and its state file; `purge`: its data too."""
    removed = teardown.destroy(check_name(name))
    with network.creation_lock(LOCK_FILE):
        if not teardown.existing_testbeds():
            tcp.restore_allowed(CONGESTION_RECORD)
    path = find_data_dir(name, data_dir)
    with contextlib.suppress(FileNotFoundError):
        (path / STATE_FILE).unlink()
    with contextlib.suppress(FileNotFoundError):
        _pointer(name).unlink()
    if purge:
        purge_data(path)
    return removed


def purge_data(data_dir: Path) -> None:
    """Delete what a testbed wrote in `data_dir` (never anything else in it)."""
    for child in data_dir.glob("*"):
        if child.name in ("repo", STATE_FILE) or (child.name[:1] == "n"
                                                  and child.name[1:].isdigit()):
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    with contextlib.suppress(OSError):
        data_dir.rmdir()  # only if nothing else is left


def _host_dict(host: Host) -> dict[str, str]:
    return {"name": host.name, "namespace": host.namespace, "address": host.address,
            "agent_url": host.agent_url}


def inspect(name: str, data_dir: str | Path | None = None) -> dict[str, Any]:
    """What exists of testbed `name`: namespaces with their process counts, link, state."""
    namespaces = teardown.namespaces_of(check_name(name))
    pids = iproute.netns_pids(namespaces)
    path = find_data_dir(name, data_dir) / STATE_FILE
    try:
        state: dict[str, Any] | None = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        state = None
    host_link = host_link_name(name) in iproute.link_names()
    return {"name": name, "exists": bool(namespaces) or host_link,
            "namespaces": {ns: len(pids[ns]) for ns in namespaces},
            "host_link": host_link,
            "state_file": str(path) if state is not None else None, "state": state}
