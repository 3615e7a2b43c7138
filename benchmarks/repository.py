"""The repository's acceptance benchmark: a real `rain serve` on loopback.

1. Throughput: on one raw image (ext4, ~1/4 data, page cache warm) time
   `openssl dgst -sha256`, `cat > /dev/null`, a first push into a fresh server
   (fresh data dir every run, so each sample is honest), a pull to a file, and a
   re-push of the same bytes (labelled "dedup re-push": nothing new is stored).
2. Dedup: push a base and 9 derived images (`parent=` the base) into one fresh
   server; total stored bytes (API `stored_bytes` and `du -sb` of the store)
   relative to one image's size and to the base's stored bytes.
3. Memory: the server's RSS (its whole process group, every 50 ms) during pushes.

Targets: push ≥ 0.7× openssl, pull ≥ 0.7× openssl, 10 images stored ≤ 1.2× one
image, server peak RSS ≤ 300 MB.

Usage:  .venv/bin/python benchmarks/repository.py [--size 2G] [--runs 3] [--markdown]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import build_image_set, human, machine_info, parse_size, read_through, table

from rain.client import Client

RAIN = [sys.executable, "-m", "rain.cli.main"]
MB = 1e6
TARGET_PUSH = 0.7
TARGET_PULL = 0.7
TARGET_STORED = 1.2
TARGET_RSS_MB = 300.0


# -- the server -------------------------------------------------------------------------------

@dataclass
class Server:
    url: str
    token: str
    data_dir: Path
    proc: subprocess.Popen[bytes]


SERVER_MODE = ["native"]  # set from --server in main()
SPARSE = [True]  # cleared by --no-sparse


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group: TERM, then KILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def rain_server(data_dir: Path) -> Iterator[Server]:
    """`rain serve` on a free loopback port with a fresh data dir; always stopped on exit."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = data_dir / "server.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*RAIN, "serve", "--host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(data_dir), "--server", SERVER_MODE[0]],
                                stdout=logf, stderr=logf, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"rain serve exited ({proc.returncode}): "
                                   f"{log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"rain serve did not come up: {log.read_text()[-2000:]}")
            try:
                if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        token = (data_dir / "admin.token").read_text().strip()
        yield Server(url, token, data_dir, proc)
    finally:
        stop(proc)


class RssSampler:
    """Peak memory of the server and all its descendants (workers, qemu-img in own sessions).

    VmRSS summed over the processes is the target's measure; it counts pages a
    forked worker shares with its parent twice, so the summed PSS (shared pages
    split between sharers, from /proc/PID/smaps_rollup) is recorded beside it.
    """

    def __init__(self, root: int, interval: float = 0.05) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0  # sum of VmRSS
        self.peak_pss = 0  # sum of Pss
        self.peak_single = 0  # largest VmRSS of one process
        self.max_procs = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _members(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # after "(comm)": state ppid ...
            children.setdefault(ppid, []).append(int(entry))
        found, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo += children.get(pid, [])
        return found

    @staticmethod
    def _field(path: str, name: str) -> int:
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return 0

    def sample(self) -> int:
        members = self._members()
        rss = [self._field(f"/proc/{p}/status", "VmRSS:") for p in members]
        pss = sum(self._field(f"/proc/{p}/smaps_rollup", "Pss:") for p in members)
        total = sum(rss)
        self.peak = max(self.peak, total)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_single = max(self.peak_single, *rss)
        self.max_procs = max(self.max_procs, len(members))
        self.samples += 1
        return total

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- measurements --------------------------------------------------------------------------

def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_tool(argv: list[str]) -> float:
    """Wall time of a command whose output goes to /dev/null."""
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


class Transfer:
    """Push / pull through the in-process Client or the `rain` CLI."""

    def __init__(self, server: Server, via: str) -> None:
        self.server = server
        self.via = via
        self.client = Client(server.url, server.token, timeout=3600, sparse=SPARSE[0])

    def close(self) -> None:
        self.client.close()

    def _cli(self, *args: str) -> str:
        argv = [*RAIN, *args, "--url", self.server.url, "--token", self.server.token, "--json"]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def push(self, path: Path, name: str, **meta: Any) -> dict[str, Any]:
        if self.via == "cli":
            extra = [a for k, v in meta.items() for a in (f"--{k}", str(v))]
            self._cli("push", str(path), "--name", name, *extra)
            found = self.client.images(name=name)
            items = found.get("images") or found.get("items") or []
            return dict(self.client.show(items[0]["id"])) if items else {}
        return self.client.push(path, name=name, **meta)

    def pull(self, ref: str, out: Path) -> dict[str, Any]:
        if self.via == "cli":
            self._cli("pull", ref, "-o", str(out))
            return {"path": str(out)}
        return self.client.pull(ref, out)


@dataclass
class Samples:
    openssl: list[float] = field(default_factory=list)
    cat: list[float] = field(default_factory=list)
    push: list[float] = field(default_factory=list)
    pull: list[float] = field(default_factory=list)
    repush: list[float] = field(default_factory=list)
    repull: list[float] = field(default_factory=list)
    push_rss: list[int] = field(default_factory=list)
    push_pss: list[int] = field(default_factory=list)
    push_rss_single: list[int] = field(default_factory=list)
    push_procs: list[int] = field(default_factory=list)
    idle_rss: list[int] = field(default_factory=list)
    first_stored: list[int] = field(default_factory=list)
    repush_stored: list[int] = field(default_factory=list)


def throughput_runs(image: Path, work: Path, runs: int, via: str, keep: bool) -> Samples:
    s = Samples()
    read_through(image)  # page cache warm before anything is timed
    out = work / "pulled.raw"
    for run in range(1, runs + 1):
        s.openssl.append(time_tool(["openssl", "dgst", "-sha256", str(image)]))
        s.cat.append(time_tool(["cat", str(image)]))
        shutil.rmtree(work / f"server-run{run}", ignore_errors=True)  # fresh, also with --keep
        with rain_server(work / f"server-run{run}") as server:
            t = Transfer(server, via)
            try:
                s.idle_rss.append(RssSampler(server.proc.pid).sample())
                with RssSampler(server.proc.pid) as rss:
                    secs, img = timed(partial(t.push, image, name="bench", version=f"run{run}"))
                s.push.append(secs)
                s.push_rss.append(rss.peak)
                s.push_pss.append(rss.peak_pss)
                s.push_rss_single.append(rss.peak_single)
                s.push_procs.append(rss.max_procs)
                s.first_stored.append(int(img.get("stored_bytes", -1)))
                secs, _ = timed(partial(t.pull, img["id"], out))
                s.pull.append(secs)
                out.unlink(missing_ok=True)
                secs, again = timed(partial(t.push, image, name="bench",
                                              version=f"run{run}-again"))
                s.repush.append(secs)
                s.repush_stored.append(int(again.get("stored_bytes", -1)))
                secs, _ = timed(partial(t.pull, again["id"], out))
                s.repull.append(secs)
                out.unlink(missing_ok=True)
            finally:
                t.close()
        print(f"  run {run}: openssl {s.openssl[-1]:.2f} s, cat {s.cat[-1]:.2f} s, "
              f"push {s.push[-1]:.2f} s, pull {s.pull[-1]:.2f} s, "
              f"dedup re-push {s.repush[-1]:.2f} s, peak RSS {s.push_rss[-1] / MB:.0f} MB",
              flush=True)
        if not keep:
            subprocess.run(["rm", "-rf", str(work / f"server-run{run}")], check=False)
    return s


@dataclass
class Family:
    size: int
    base_stored: int
    api_total: int
    du_store: int
    peak_rss: int
    push_seconds: list[float]


def du_sb(path: Path) -> int:
    out = subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True, text=True)
    return int(out.stdout.split()[0])


def family_run(images: list[Path], work: Path, via: str) -> Family:
    """Base + derived (parent = base) into one fresh server."""
    shutil.rmtree(work / "server-family", ignore_errors=True)
    with rain_server(work / "server-family") as server:
        t = Transfer(server, via)
        try:
            with RssSampler(server.proc.pid) as rss:
                secs = []
                dt, base = timed(partial(t.push, images[0], name="family", version="0"))
                secs.append(dt)
                stored = [int(base["stored_bytes"])]
                for i, p in enumerate(images[1:], 1):
                    dt, img = timed(partial(t.push, p, name="family", version=str(i),
                                               parent=base["id"]))
                    secs.append(dt)
                    stored.append(int(img["stored_bytes"]))
        finally:
            t.close()
        du = du_sb(server.data_dir / "store")
    return Family(images[0].stat().st_size, stored[0], sum(stored), du, rss.peak, secs)


# -- report --------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


Table = tuple[list[str], list[list[str]]]


def report(size: int, s: Samples, fam: Family | None, runs: int) -> tuple[Table, Table]:
    """(throughput table, storage and memory table)."""
    med = statistics.median

    def mbps(secs: float) -> float:
        return size / secs / MB

    ossl, cat = mbps(med(s.openssl)), mbps(med(s.cat))

    def tr(name: str, samples: list[float], target: float | None) -> list[str]:
        v = mbps(med(samples))
        spread = f" ({min(samples):.2f}–{max(samples):.2f})" if len(samples) > 1 else ""
        return [name, f"{med(samples):.2f}{spread}", f"{v:.0f}", f"{v / ossl:.2f}",
                f"{v / cat:.2f}", f"≥ {target}× openssl" if target else "",
                verdict(v / ossl >= target) if target else ""]

    speed = (["measurement", "wall s, median (min–max)", "MB/s", "÷ openssl", "÷ cat", "target",
              "result"],
             [tr("openssl dgst -sha256", s.openssl, None),
              tr("cat > /dev/null", s.cat, None),
              tr(f"first push (fresh server each run, {runs} runs)", s.push, TARGET_PUSH),
              tr("pull to file (of the first push)", s.pull, TARGET_PULL),
              tr("dedup re-push (same bytes, new version)", s.repush, None),
              tr("pull of the re-push", s.repull, None)])

    peak = max(s.push_rss) / MB
    rows = [["server peak RSS during first push (max of runs; Σ VmRSS of server + children)",
             f"{peak:.0f} MB", "", "", f"≤ {TARGET_RSS_MB:.0f} MB", verdict(peak <= TARGET_RSS_MB)],
            ["  same, Σ PSS (shared pages counted once)", f"{max(s.push_pss) / MB:.0f} MB",
             "", "", "", ""],
            [f"  largest single process (of ≤ {max(s.push_procs)} processes)",
             f"{max(s.push_rss_single) / MB:.0f} MB", "", "", "", ""],
            ["server RSS when idle, before the first push (median)",
             f"{statistics.median(s.idle_rss) / MB:.0f} MB", "", "", "", ""],
            ["stored by a first push", human(med(s.first_stored)),
             f"{med(s.first_stored) / size:.3f}", "", "", ""],
            ["stored by a dedup re-push", human(med(s.repush_stored)), "", "", "", ""]]
    if fam is not None:
        n = len(fam.push_seconds)
        worst = max(fam.api_total, fam.du_store) / fam.size
        rows += [
            [f"{n} images stored (sum of API stored_bytes)", human(fam.api_total),
             f"{fam.api_total / fam.size:.3f}", f"{fam.api_total / fam.base_stored:.3f}",
             "", ""],
            [f"{n} images stored (du -sb data_dir/store)", human(fam.du_store),
             f"{fam.du_store / fam.size:.3f}", f"{fam.du_store / fam.base_stored:.3f}",
             f"≤ {TARGET_STORED}× one image", verdict(worst <= TARGET_STORED)],
            [f"server peak RSS during the {n} pushes (Σ VmRSS)", f"{fam.peak_rss / MB:.0f} MB",
             "", "",
             f"≤ {TARGET_RSS_MB:.0f} MB", verdict(fam.peak_rss / MB <= TARGET_RSS_MB)],
        ]
    storage = (["measurement", "value", "÷ one image", "÷ base stored", "target", "result"], rows)
    return speed, storage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G", help="image size (default 2G)")
    ap.add_argument("--runs", type=int, default=3, help="push/pull repetitions (default 3)")
    ap.add_argument("--derived", type=int, default=9, help="derived images (default 9)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/rain-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the work dir (images are reused)")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--via", choices=("client", "cli"), default="client",
                    help="push/pull with the in-process Client (default) or the rain CLI")
    ap.add_argument("--skip-family", action="store_true", help="only the throughput part")
    ap.add_argument("--no-sparse", action="store_true",
                    help="send and receive every byte (no sparse transfer encoding)")
    ap.add_argument("--server", choices=("native", "uvicorn"), default="native",
                    help="rain serve front end (default native; uvicorn = pure ASGI baseline)")
    args = ap.parse_args(argv)
    SERVER_MODE[0] = args.server
    SPARSE[0] = not args.no_sparse

    size = parse_size(args.size)
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    try:
        imgs = build_image_set(work, size, args.derived, args.seed)
        print(f"throughput on {imgs.base} ({human(size)}), {args.runs} runs:", flush=True)
        samples = throughput_runs(imgs.base, work, args.runs, args.via, args.keep)
        fam = None
        if not args.skip_family:
            print(f"dedup: base + {args.derived} derived into one server", flush=True)
            for p in imgs.all:
                read_through(p)
            fam = family_run(imgs.all, work, args.via)
        tables = report(size, samples, fam, args.runs)
        for headers, rows in tables:
            print()
            print(table(headers, rows))
        if args.markdown:
            m = machine_info()
            print("\n## Repository benchmark\n")
            print(f"- machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['kernel']}, "
                  f"Python {m['python']}")
            print(f"- date: {started}")
            print(f"- command: `{command}`")
            print(f"- image: {human(size)} raw, ext4 with {human(imgs.data_bytes)} of files, "
                  f"page cache warm; client and server on the same machine (loopback), "
                  f"push/pull via {args.via}, server front end {args.server}, "
                  f"sparse transfer {'off' if args.no_sparse else 'on'}\n")
            for headers, rows in tables:
                print(table(headers, rows, markdown=True))
                print()
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
