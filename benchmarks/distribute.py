"""Raining one image onto N nodes: transfer methods against the lower bound (issue 4).

Brings up a `rain.testbed` of network namespaces (every link — the
repository's too — shaped to `--rate` in both directions by tc tbf), pushes
fresh images of `--size` random bytes (incompressible, no zero chunks: every
byte must move) and deploys 8 instances per node with each method, through
the real `rain serve` and `rain agent` processes. For every run it prints the
makespan (request → last instance ready), first-ready, the bytes the
repository sent (from the deployment report and, as ground truth, from the
repository link's tx counter), the CPU the machine spent, and the ratio to
the lower bound

    T* = max(S/R_repo, S/R_node, N·S/(R_repo + N·R_node))

at the nominal link rate (TCP payload can use at most 0.993 of it with the
default 9000-byte MTU: 8948 of every 9014 bytes on the wire; 0.956 at 1500).
Further sections: seed 002's request mixes (1, 2, 4, 8 images over the
nodes at once), a derived image over a cached
base with `chunks`, 192 instances over 24 nodes from the cache, and the cost
of encryption (BitTorrent RC4).

    .venv/bin/python benchmarks/distribute.py --markdown --png docs   # ~40 min
    .venv/bin/python benchmarks/distribute.py --nodes 4 --methods http,tree --skip-mixes \\
        --skip-chunks --skip-encryption                                # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from images import MiB, human, parse_size, table

from rain.client import Client
from rain.testbed import Testbed, check_link_rate

CLK = os.sysconf("SC_CLK_TCK")


# -- measuring ---------------------------------------------------------------------------
def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return float(sum(fields) - idle), float(sum(fields))


def testbed_cpu(tb: Testbed) -> float:
    """CPU seconds (user + system) of every process in the testbed's namespaces."""
    total = 0
    for ns in [tb.repo.namespace, *(n.namespace for n in tb.nodes)]:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(stat[11]) + int(stat[12])
    return total / CLK


@dataclass
class Run:
    label: str
    method: str
    nodes: int
    size: int
    rate: float  # bytes/s, nominal
    makespan: float | None = None
    first_ready: float | None = None
    fetch_max: float | None = None
    repo_bytes_report: int = 0
    repo_bytes_wire: int = 0
    peer_bytes: int = 0
    cpu_busy: float = 0.0  # fraction of all cores, machine-wide
    cpu_seconds: float = 0.0  # rain processes in the testbed
    status: str = ""
    error: str | None = None
    per_node: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def t_star(self) -> float:
        s, r, n = self.size, self.rate, self.nodes
        return max(s / r, s / r, n * s / (r + n * r))

    def ratio(self) -> float | None:
        return None if self.makespan is None else self.makespan / self.t_star


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.size = parse_size(args.size)
        self.rate = check_link_rate(args.rate) / 8  # bytes/s
        self.nodes = sorted(int(n) for n in args.nodes.split(","))
        self.http_nodes = {int(n) for n in args.http_nodes.split(",")} if args.http_nodes \
            else set()
        self.mix_size = parse_size(args.mix_size) if args.mix_size else self.size
        self.work = Path(args.work_dir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.tb = Testbed(args.name, nodes=max(self.nodes), rate=args.rate, capacity=8,
                          cache_size=args.cache_size, mtu=args.mtu,
                          congestion=args.congestion)
        self.client: Client | None = None
        self.counter = 0

    # -- plumbing -------------------------------------------------------------------
    def up(self) -> None:
        self.tb.up()
        self.client = Client(self.tb.url, self.tb.token, timeout=600)

    def down(self) -> None:
        if self.client is not None:
            self.client.close()
        self.tb.down(purge=not self.args.keep)

    @property
    def c(self) -> Client:
        assert self.client is not None
        return self.client

    def image(self, size: int | None = None, base: Path | None = None,
              changed: int = 0) -> tuple[dict[str, Any], Path]:
        """A fresh image of random bytes (or `base` with `changed` bytes rewritten)."""
        self.counter += 1
        size = size or self.size
        path = self.work / f"img-{self.counter}.raw"
        seed = hashlib.sha256(f"{self.args.seed}-{self.counter}".encode()).digest()
        if base is None:
            with path.open("wb") as f:
                block = 4 * MiB
                for off in range(0, size, block):
                    f.write(_random(seed + off.to_bytes(8, "big"), min(block, size - off)))
        else:
            data = bytearray(base.read_bytes())
            # `changed` bytes in 4 runs spread over the image (chunk-aligned or not: the
            # repository stores whatever chunks they touch).
            part = changed // 4
            for k in range(4):
                off = (k * 2 + 1) * len(data) // 8
                data[off : off + part] = _random(seed + bytes([k]), part)
            path.write_bytes(bytes(data))
        # Pushed from inside the repository's namespace: over its loopback, not through
        # its shaped link (a 128 MiB push would take the link's T* every time).
        out = self.tb.exec("repo", [sys.executable, "-m", "rain.cli.main", "push", str(path),
                                    "--name", f"bench-{self.counter}", "--disk-format", "raw",
                                    "--json", "--url", self.tb.url, "--token", self.tb.token],
                           timeout=600)
        info = json.loads(out.stdout)
        return info, path

    def names(self, n: int) -> list[str]:
        return [h.name for h in self.tb.nodes[:n]]

    def deploy(self, label: str, image: dict[str, Any], n: int, method: str, *,
               count: int | None = None, options: dict[str, Any] | None = None,
               prefetch: bool = False) -> Run:
        run = Run(label, method, n, int(image["size"]), self.rate)
        wire0 = self.tb.interface_bytes("repo").tx
        cpu0, busy0 = testbed_cpu(self.tb), machine_busy()
        t0 = time.monotonic()
        if prefetch:
            dep = self.c.prefetch(image["id"], nodes=self.names(n), method=method,
                                  options=options)
        else:
            dep = self.c.deploy(image["id"], nodes=self.names(n), count=count or 8 * n,
                                method=method, options=options)
        final = self.c.follow_deployment(dep["id"], interval=0.25, timeout=3600)
        wall = time.monotonic() - t0
        busy1 = machine_busy()
        run.cpu_seconds = testbed_cpu(self.tb) - cpu0
        run.cpu_busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0)
        run.repo_bytes_wire = self.tb.interface_bytes("repo").tx - wire0
        r = final.get("report") or {}
        run.status, run.error = final["status"], final.get("error")
        run.makespan, run.first_ready = r.get("makespan_s"), r.get("first_ready_s")
        run.repo_bytes_report = int(r.get("repo_bytes_sent") or 0)
        run.peer_bytes = int(r.get("peer_bytes_received") or 0)
        run.per_node = r.get("per_node") or {}
        fetched = [p.get("fetched_s") for p in run.per_node.values() if p.get("fetched_s")]
        run.fetch_max = max(fetched) if fetched else None
        run.extra["wall"] = wall
        run.extra["method_chosen"] = r.get("method")
        self.cleanup(final)
        print(f"  {label}: {method} N={n} {run.status} makespan {run.makespan} s "
              f"(T* {run.t_star:.1f} s, ×{run.ratio() or 0:.2f}), repo {human(run.repo_bytes_wire)}"
              f", cpu {run.cpu_busy:.0%}", file=sys.stderr, flush=True)
        return run

    def cleanup(self, final: dict[str, Any]) -> None:
        """Free the instance slots for the next run (the images stay cached)."""
        insts = [i["id"] for i in self.c.instances(deployment=final["id"])
                 if i["status"] == "ready"]

        def delete(ids: list[str]) -> None:
            # A client per thread: one httpx client shared by 24 threads lost requests.
            with Client(self.tb.url, self.tb.token, timeout=120) as c:
                for i in ids:
                    c.delete_instance(i)

        threads = [threading.Thread(target=delete, args=(insts[k::8],)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        left = [i for i in self.c.instances(deployment=final["id"]) if i["status"] == "ready"]
        if left:
            raise RuntimeError(f"{len(left)} instances of {final['id']} were not deleted")

    # -- sections ---------------------------------------------------------------------
    def methods(self) -> list[Run]:
        runs = []
        for n in self.nodes:
            for method in self.args.methods.split(","):
                if method == "http" and self.http_nodes and n not in self.http_nodes:
                    continue
                image, _ = self.image()
                opts = {"rate": self.rate} if method == "multicast" else {}
                runs.append(self.deploy("one image", image, n, method, options=opts))
        return runs

    def single_tree(self) -> list[Run]:
        """The paper's plain binary tree (one stripe), for comparison with the striped one."""
        n = max(self.nodes)
        image, _ = self.image()
        return [self.deploy("single binary tree", image, n, "tree",
                            options={"fanout": 2, "stripes": 1})]

    def mixes(self) -> list[Run]:
        """K images at once over all nodes, 8N/K instances each (seed 002's 1×192 … 8×24)."""
        n = max(self.nodes)
        runs = []
        for method in self.args.mix_methods.split(","):
            for k in (int(x) for x in self.args.mixes.split(",")):
                images = [self.image(self.mix_size)[0] for _ in range(k)]
                wire0 = self.tb.interface_bytes("repo").tx
                busy0 = machine_busy()
                t0 = time.monotonic()
                deps = [self.c.deploy(im["id"], all=True, count=8 * n // k, method=method)
                        for im in images]
                finals = [self.c.follow_deployment(d["id"], interval=0.25, timeout=3600)
                          for d in deps]
                wall = time.monotonic() - t0
                busy1 = machine_busy()
                run = Run(f"mix {k}×{8 * n // k}", method, n, self.mix_size, self.rate)
                run.status = ",".join(sorted({f["status"] for f in finals}))
                run.makespan = wall  # from the first request to the last instance
                run.repo_bytes_wire = self.tb.interface_bytes("repo").tx - wire0
                run.cpu_busy = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1.0)
                run.extra["k"] = k
                # k images of S: the repository must send k·S at least once, each node
                # receives S (its 8 instances are of one image).
                run.extra["t_star"] = max(k * self.mix_size / self.rate,
                                          self.mix_size / self.rate)
                for f in finals:
                    self.cleanup(f)
                print(f"  mix {k}: {method} makespan {wall:.1f} s (T* "
                      f"{run.extra['t_star']:.1f} s)", file=sys.stderr, flush=True)
                runs.append(run)
        return runs

    def chunks(self) -> list[Run]:
        """A derived image over a base every node caches: chunks against http."""
        n = min(max(self.nodes), 8)
        base, base_path = self.image()
        self.deploy("base (prefetch)", base, n, "bittorrent", prefetch=True)
        changed = parse_size(self.args.changed)
        runs = []
        for method in ("chunks", "http"):
            derived, _ = self.image(base=base_path, changed=changed)
            run = self.deploy("derived over cached base", derived, n, method)
            worst = max(int(p.get("repo_bytes", 0)) + int(p.get("peer_bytes", 0))
                        for p in run.per_node.values())
            run.extra["changed"] = changed
            run.extra["moved_per_node"] = worst
            runs.append(run)
        return runs

    def instances(self) -> list[Run]:
        """192 instances over 24 nodes (8 each) with the image already cached."""
        n = max(self.nodes)
        image, _ = self.image()
        self.deploy("warm-up (prefetch)", image, n, "bittorrent", prefetch=True)
        run = self.deploy("instances from cache", image, n, "auto", count=8 * n)
        per = []
        for p in run.per_node.values():
            ready = sorted(i["ready_s"] for i in p.get("instances", []) if i.get("ready_s"))
            per += [b - a for a, b in itertools.pairwise(ready)]
        run.extra["per_instance_ms"] = 1000 * statistics.median(per) if per else None
        return [run]

    def encryption(self) -> list[Run]:
        n = min(max(self.nodes), 8)
        runs = []
        for encrypt in (False, True):
            image, _ = self.image()
            run = self.deploy(f"bittorrent {'encrypted' if encrypt else 'plain'}", image, n,
                              "bittorrent", options={"encrypt": encrypt})
            run.extra["encrypt"] = encrypt
            runs.append(run)
        return runs


def _random(seed: bytes, n: int) -> bytes:
    """`n` incompressible bytes from a seed (SHAKE-256: fast and repeatable)."""
    return hashlib.shake_256(seed).digest(n)


# -- printing --------------------------------------------------------------------------
def method_rows(runs: list[Run], http_runs: list[Run] | None = None) -> list[list[str]]:
    http = {r.nodes: r.makespan for r in [*(http_runs or []), *runs]
            if r.method == "http" and r.makespan}
    rows = []
    for r in runs:
        speedup = (http.get(r.nodes) or 0) / r.makespan if r.makespan else 0
        method = f"{r.method} (RC4)" if r.extra.get("encrypt") else r.method
        rows.append([str(r.nodes), method, _s(r.makespan), _s(r.first_ready), _s(r.t_star),
                     f"{r.ratio():.2f}" if r.ratio() else "-",
                     f"{speedup:.1f}×" if speedup else "-",
                     f"{r.repo_bytes_wire / r.size:.2f}", f"{r.repo_bytes_report / r.size:.2f}",
                     f"{r.peer_bytes / r.size:.1f}", f"{r.cpu_busy:.0%}", r.status])
    return rows


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def plot(runs: list[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    methods = sorted({r.method for r in runs})
    for m in methods:
        pts = sorted((r.nodes, r.makespan) for r in runs if r.method == m and r.makespan)
        if pts:
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m)
            ax2.plot([p[0] for p in pts],
                     [p[1] / next(r.t_star for r in runs if r.nodes == p[0]) for p in pts],
                     marker="o", label=m)
    ns = sorted({r.nodes for r in runs})
    ax1.plot(ns, [next(r.t_star for r in runs if r.nodes == n) for n in ns], "k--",
             label="T* (lower bound)")
    ax1.set_xlabel("nodes")
    ax1.set_ylabel("makespan (s)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("one image onto N nodes, 8 instances each")
    ax2.axhline(1.5, color="grey", ls=":", label="target 1.5 × T*")
    ax2.set_xlabel("nodes")
    ax2.set_ylabel("makespan / T*")
    ax2.set_yscale("log")
    ax2.legend()
    ax2.set_title("ratio to the lower bound")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="4,8,16,24")
    ap.add_argument("--size", default="64M", help="image size (random data)")
    ap.add_argument("--rate", default="100mbit", help="every link, both directions")
    ap.add_argument("--methods", default="http,tree,multicast,bittorrent")
    ap.add_argument("--http-nodes", default="",
                    help="run http only at these N (its makespan is N·S/R: the long part)")
    ap.add_argument("--mixes", default="1,2,4,8")
    ap.add_argument("--mix-size", default="", help="image size in the mixes (default --size)")
    ap.add_argument("--mix-methods", default="bittorrent,tree",
                    help="http's 1×8N mix is the methods section's N=max row")
    ap.add_argument("--changed", default="8M", help="chunks section: bytes changed")
    ap.add_argument("--cache-size", default="12G")
    ap.add_argument("--mtu", type=int, default=9000,
                    help="jumbo frames: the kernel's per-packet work is most of the CPU")
    ap.add_argument("--congestion", default=None,
                    help="TCP congestion control of every testbed host [default: cubic, or "
                         "the machine's default where the kernel lacks it]")
    ap.add_argument("--name", default="bench")
    ap.add_argument("--seed", default="rain")
    ap.add_argument("--work-dir", default="/tmp/rain-bench-distribute")
    for section in ("methods", "single-tree", "mixes", "chunks", "instances", "encryption"):
        ap.add_argument(f"--skip-{section}", action="store_true")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--png", type=Path, help="directory for the charts")
    ap.add_argument("--json", type=Path, help="write every run here")
    ap.add_argument("--http-from", type=Path,
                    help="a --json file of an earlier run whose http rows the 'vs http' "
                         "column compares against (the http sweep is the long part)")
    ap.add_argument("--keep", action="store_true", help="keep the testbed's data")
    args = ap.parse_args()

    bench = Bench(args)
    started = datetime.now(UTC)
    results: dict[str, list[Run]] = {}
    bench.up()
    try:
        for section in ("methods", "single_tree", "mixes", "chunks", "instances",
                        "encryption"):
            if getattr(args, f"skip_{section}"):
                continue
            print(f"== {section}", file=sys.stderr, flush=True)
            results[section] = getattr(bench, section)()
    finally:
        bench.down()

    md = args.markdown
    cc = bench.tb.congestion
    print(f"# benchmarks/distribute.py — {started:%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{os.cpu_count()} cores; S = {human(bench.size)}, every link {args.rate} "
          f"both ways, MTU {args.mtu}, TCP congestion control "
          f"{cc.name if cc else args.congestion} "
          f"(T* at the nominal rate; TCP payload ≤ {(args.mtu - 52) / (args.mtu + 14):.3f} "
          "of it)" + (f"; {cc.note}" if cc and cc.note else "") + "\n")
    headers = ["N", "method", "makespan s", "first ready s", "T* s", "÷ T*", "vs http",
               "repo bytes ÷ S (wire)", "(report)", "peer bytes ÷ S", "CPU busy", "status"]
    earlier: list[Run] = []
    if args.http_from:
        loaded = json.loads(args.http_from.read_text())
        earlier = [Run(**r) for r in loaded.get("methods", []) if r["method"] == "http"]
        results.setdefault("methods", [])
        results["methods"] = sorted([*earlier, *results["methods"]],
                                    key=lambda r: (r.nodes, r.method != "http"))
    for section in ("methods", "single_tree", "encryption"):
        if section in results:
            print(f"\n## {section}\n")
            rows = method_rows(results[section], earlier if section != "methods" else [])
            print(table(headers, rows, md))
    if "mixes" in results:
        print(f"\n## request mixes (all nodes, 8 instances per node in all; images of "
              f"{human(bench.mix_size)})\n")
        rows = [[r.label, r.method, _s(r.makespan), _s(r.extra["t_star"]),
                 f"{(r.makespan or 0) / r.extra['t_star']:.2f}",
                 f"{r.repo_bytes_wire / (r.extra['k'] * r.size):.2f}", f"{r.cpu_busy:.0%}",
                 r.status] for r in results["mixes"]]
        print(table(["mix", "method", "makespan s", "T* s", "÷ T*", "repo bytes ÷ k·S",
                     "CPU busy", "status"], rows, md))
    if "chunks" in results:
        print("\n## derived image over a cached base\n")
        rows = [[r.method, human(r.extra["changed"]), human(r.extra["moved_per_node"]),
                 f"{r.extra['moved_per_node'] / r.extra['changed']:.2f}", _s(r.makespan),
                 r.status] for r in results["chunks"]]
        print(table(["method", "changed", "moved to a node (max)", "÷ changed",
                     "makespan s", "status"], rows, md))
    if "instances" in results:
        r = results["instances"][0]
        print("\n## instances from the cache\n")
        print(table(["instances", "nodes", "makespan s", "first ready s",
                     "per instance ms (median, on a node)", "status"],
                    [[str(8 * r.nodes), str(r.nodes), _s(r.makespan), _s(r.first_ready),
                      f"{r.extra['per_instance_ms']:.0f}" if r.extra.get("per_instance_ms")
                      else "-", r.status]], md))
    if args.png and "methods" in results:
        args.png.mkdir(parents=True, exist_ok=True)
        plot(results["methods"], args.png / "distribute-methods.png")
    if args.json:
        args.json.write_text(json.dumps({k: [vars(r) for r in v] for k, v in results.items()},
                                        indent=1, default=str))


if __name__ == "__main__":
    main()
