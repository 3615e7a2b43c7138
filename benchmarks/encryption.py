"""What securing the transfer costs (seed 004): the same deployment in the clear and encrypted.

Runs a real `rain serve` and `--nodes` real `rain agent` processes on loopback
(no shaping: the point is the CPU that encryption adds, which is what limits
a node's rate once links are fast), pushes one image of `--size` random bytes
per run and deploys it with each method twice — plain, then encrypted:

- `http` and `tree`: HTTPS everywhere (the repository, the agents' APIs and
  their peer endpoints; a throwaway CA from openssl), against plain HTTP;
- `bittorrent`: libtorrent's RC4 peer encryption (`--encrypt`), against none.

For each it prints the makespan, the CPU seconds every rain process spent
(server + agents, user + system, from /proc) and CPU seconds per GiB
delivered, and the encrypted/plain ratios.

    .venv/bin/python benchmarks/encryption.py --markdown        # 4 nodes, 256 MiB, ~3 min
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from images import human, parse_size, table
from tests.conftest import RAIN, free_port
from tests.distribute.test_deploy import make_certs

from rain.client import Client

CLK = os.sysconf("SC_CLK_TCK")


def cpu_of(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
        except (OSError, IndexError):
            pass
    return total / CLK


class Cluster:
    """A server and agents on loopback, plain or all-HTTPS."""

    def __init__(self, root: Path, nodes: int, tls: bool) -> None:
        self.root, self.tls = root, tls
        root.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.ca: Path | None = None
        extra_serve: list[str] = []
        extra_agent: list[str] = []
        env = dict(os.environ)
        if tls:
            ca, cert, key = make_certs(root)
            self.ca = ca
            extra_serve = ["--tls-cert", str(cert), "--tls-key", str(key)]
            extra_agent = ["--tls-cert", str(cert), "--tls-key", str(key), "--ca", str(ca)]
            env["RAIN_DISTRIBUTE__AGENT_CA"] = str(ca)
        data = root / "repo"
        self._spawn([*RAIN, "serve", "--port", str(self.port), "--data-dir", str(data),
                     *extra_serve], root / "server.log", env)
        self.verify: Any = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        self._wait(lambda: httpx.get(f"{self.url}/v1/health", verify=self.verify,
                                     timeout=1).status_code == 200)
        self.token = (data / "admin.token").read_text().strip()
        self.names = [f"e{i}" for i in range(1, nodes + 1)]
        for name in self.names:
            self._spawn([*RAIN, "agent", "--name", name, "--repo", self.url, "--token",
                         self.token, "--cache-dir", str(root / name), "--cache-size", "20G",
                         "--listen", f"127.0.0.1:{free_port()}", "--capacity", "1",
                         "--heartbeat", "1", *extra_agent], root / f"{name}.log", env)
        self.client = Client(self.url, self.token, ca=str(self.ca) if self.ca else None,
                             timeout=600)
        self._wait(lambda: sum(1 for n in self.client.nodes() if n["up"]) == nodes)

    def _spawn(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        with open(log, "wb") as f:
            self.procs.append(subprocess.Popen(argv, stdout=f, stderr=f, env=env,
                                               start_new_session=True))

    @staticmethod
    def _wait(ok: Any, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():
                    return
            except (httpx.HTTPError, Exception):
                pass
            time.sleep(0.3)
        raise RuntimeError("cluster did not come up")

    def close(self) -> None:
        self.client.close()
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def run(cluster: Cluster, image: Path, method: str, encrypt: bool) -> dict[str, Any]:
    c = cluster.client
    info = c.push(image, name=f"enc-{time.monotonic_ns()}", disk_format="raw")
    pids = [p.pid for p in cluster.procs]
    cpu0, t0 = cpu_of(pids), time.monotonic()
    dep = c.deploy(info["id"], nodes=cluster.names, count=len(cluster.names), method=method,
                   options={"encrypt": True} if encrypt else {})
    final = c.follow_deployment(dep["id"], interval=0.2, timeout=1800)
    wall = time.monotonic() - t0
    cpu = cpu_of(pids) - cpu0
    for inst in c.instances(deployment=final["id"]):
        c.delete_instance(inst["id"])
    r = final["report"]
    delivered = image.stat().st_size * len(cluster.names)
    return {"method": method, "secure": encrypt or cluster.tls, "status": final["status"],
            "makespan": r.get("makespan_s"), "wall": wall, "cpu": cpu,
            "cpu_per_gib": cpu / (delivered / 2**30)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size", default="256M")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    size = parse_size(args.size)
    root = Path(tempfile.mkdtemp(prefix="rain-bench-enc-"))
    image = root / "image.raw"
    with image.open("wb") as f:
        for off in range(0, size, 4 << 20):
            f.write(hashlib.shake_256(off.to_bytes(8, "big")).digest(min(4 << 20, size - off)))
    rows = []
    try:
        for tls in (False, True):
            cluster = Cluster(root / ("tls" if tls else "plain"), args.nodes, tls)
            try:
                for method in ("http", "tree"):
                    rows.append(run(cluster, image, method, False))
                    print(f"  {method} {'https' if tls else 'http'}: {rows[-1]}", file=sys.stderr)
                if not tls:
                    for encrypt in (False, True):
                        rows.append(run(cluster, image, "bittorrent", encrypt))
                        print(f"  bittorrent encrypt={encrypt}: {rows[-1]}", file=sys.stderr)
            finally:
                cluster.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    plain = {r["method"]: r for r in rows if not r["secure"]}
    out = []
    for r in rows:
        base = plain[r["method"]]
        how = {"http": "HTTPS" if r["secure"] else "HTTP", "tree": "HTTPS" if r["secure"]
               else "HTTP", "bittorrent": "RC4" if r["secure"] else "none"}[r["method"]]
        out.append([r["method"], how, f"{r['makespan']:.2f}", f"{r['cpu']:.1f}",
                    f"{r['cpu_per_gib']:.2f}",
                    f"{r['makespan'] / base['makespan']:.2f}" if r["secure"] else "",
                    f"{r['cpu'] / base['cpu']:.2f}" if r["secure"] else "", r["status"]])
    print(f"# benchmarks/encryption.py — {args.nodes} nodes on loopback, "
          f"{human(size)} image, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC\n")
    print(table(["method", "encryption", "makespan s", "CPU s (server + agents)",
                 "CPU s per GiB delivered", "time ÷ plain", "CPU ÷ plain", "status"], out,
                args.markdown))


if __name__ == "__main__":
    main()
