"""Server memory at 40 concurrent transfers: a real `rain serve`, its RSS sampled.

Twenty users each push one new image and pull one stored image at the same
time (images of 16–64 MiB, incompressible data, so every byte moves), once
with rain's client (`rain.client.Client`, sparse encoding on) and once with
plain HTTP (`http.client`: `PUT` of `application/octet-stream` with a
Content-Length, `GET` without `Accept: application/vnd.rain.sparse`). The
server's RSS (Σ VmRSS of its process group, every 50 ms) is recorded: its
peak during each round, and what it holds once idle again (a few seconds
after the last transfer). Target: ≤ 300 MB at 40 streams, and most of it
given back when idle.

Usage:  .venv/bin/python benchmarks/memory.py [--streams 40] [--markdown]
                                               [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import http.client
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from images import MiB, machine_info, table
from repository import RssSampler, Server, rain_server

from rain.client import Client

MB = 1e6
TARGET_MB = 300.0
SIZES = (16, 32, 48, 64)  # MiB, cycled: 40 MiB on average
IDLE_WAIT = 5.0  # seconds after the last transfer before the idle sample
SECTION = "## Server memory at 40 streams"


@dataclass
class Round:
    name: str
    seconds: float
    moved: int  # bytes pushed + pulled
    peak: int  # Σ VmRSS
    peak_pss: int
    peak_single: int  # VmRSS of the largest process (the server itself, not its qemu-img)
    idle: int  # Σ VmRSS, IDLE_WAIT s after the round


def make_images(work: Path, count: int, seed: int) -> list[Path]:
    """`count` files of random bytes, 16–64 MiB (reused when present)."""
    out = []
    rng = np.random.default_rng(seed)
    for i in range(count):
        size = SIZES[i % len(SIZES)] * MiB
        path = work / f"img-{seed}-{i:02d}.raw"
        data = rng.bytes(size)  # drawn even when reused, so every file keeps its content
        if not path.exists() or path.stat().st_size != size:
            path.write_bytes(data)
        out.append(path)
    return out


def plain_put(url: str, token: str, ref: str, path: Path) -> None:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    try:
        conn.putrequest("PUT", f"/v1/images/{ref}/file")
        conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(path.stat().st_size))
        conn.endheaders()
        with open(path, "rb") as f:
            while block := f.read(1024 * 1024):
                conn.send(block)
        resp = conn.getresponse()
        body = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"PUT {ref}: {resp.status} {body[:200]!r}")
    finally:
        conn.close()


def plain_get(url: str, token: str, ref: str) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=300)
    try:
        conn.request("GET", f"/v1/images/{ref}/file", headers={"Authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"GET {ref}: {resp.status} {resp.read()[:200]!r}")
        got = 0
        buf = memoryview(bytearray(1024 * 1024))
        while n := resp.readinto(buf):
            got += n
        return got
    finally:
        conn.close()


def run_round(server: Server, name: str, jobs: list[Callable[[], int]]) -> Round:
    """All jobs at once (one thread each); the server's RSS sampled throughout."""
    start = threading.Barrier(len(jobs))

    def go(job: Callable[[], int]) -> int:
        start.wait()
        return job()

    with RssSampler(server.proc.pid) as rss, ThreadPoolExecutor(len(jobs)) as pool:
        t0 = time.perf_counter()
        moved = sum(pool.map(go, jobs))
        secs = time.perf_counter() - t0
    time.sleep(IDLE_WAIT)
    idle = RssSampler(server.proc.pid).sample()
    return Round(name, secs, moved, rss.peak, rss.peak_pss, rss.peak_single, idle)


def rounds(server: Server, work: Path, pairs: int, tmp: Path) -> tuple[int, list[Round]]:
    admin = Client(server.url, server.token, timeout=300)
    users = []
    for i in range(pairs):
        _, token = admin_user(admin, f"bench{i:02d}")
        users.append(token)
    stored = make_images(work, pairs, seed=1)
    fresh_a = make_images(work, pairs, seed=2)
    fresh_b = make_images(work, pairs, seed=3)
    ids = []
    for token, path in zip(users, stored, strict=True):  # what the pulls read, pushed first
        with Client(server.url, token, timeout=300) as c:
            ids.append(c.push(path, name="stored", version=path.stem)["id"])
    before = RssSampler(server.proc.pid).sample()

    def client_push(token: str, path: Path) -> Callable[[], int]:
        def job() -> int:
            with Client(server.url, token, timeout=300) as c:
                c.push(path, name="pushed", version=path.stem)
            return path.stat().st_size
        return job

    def client_pull(token: str, ref: str, out: Path) -> Callable[[], int]:
        def job() -> int:
            with Client(server.url, token, timeout=300) as c:
                got = int(c.pull(ref, out)["size"])
            out.unlink(missing_ok=True)
            return got
        return job

    def http_push(token: str, path: Path) -> Callable[[], int]:
        def job() -> int:
            with Client(server.url, token, timeout=300) as c:
                ref = c.create_image(name="plain", version=path.stem)["id"]
            plain_put(server.url, token, ref, path)
            return path.stat().st_size
        return job

    def http_pull(token: str, ref: str) -> Callable[[], int]:
        return lambda: plain_get(server.url, token, ref)

    out = []
    jobs: list[Callable[[], int]] = []
    for i, token in enumerate(users):
        jobs += [client_push(token, fresh_a[i]), client_pull(token, ids[i], tmp / f"pull-{i}")]
    print(f"  rain client: {len(jobs)} streams ...", flush=True)
    out.append(run_round(server, "rain client (sparse encoding on)", jobs))
    jobs = []
    for i, token in enumerate(users):
        jobs += [http_push(token, fresh_b[i]), http_pull(token, ids[i])]
    print(f"  plain HTTP: {len(jobs)} streams ...", flush=True)
    out.append(run_round(server, "plain HTTP (http.client)", jobs))
    admin.close()
    return before, out


def admin_user(admin: Client, name: str) -> tuple[dict[str, object], str]:
    user = admin.create_user(name)
    return user, str(user["token"])


def report(before: int, results: list[Round], streams: int) -> tuple[list[str], list[list[str]]]:
    rows = [["server RSS before the rounds (20 images stored, idle)", "", "", "",
             f"{before / MB:.0f} MB", "", ""]]
    for r in results:
        ok = r.peak / MB <= TARGET_MB
        rows.append([f"{streams} streams, {r.name}", f"{r.seconds:.1f}",
                     f"{r.moved / r.seconds / MB:.0f}", f"{r.peak / MB:.0f} MB",
                     f"{r.idle / MB:.0f} MB", f"≤ {TARGET_MB:.0f} MB peak",
                     "PASS" if ok else "FAIL"])
        rows.append(["  same, peak Σ PSS (shared pages counted once)", "", "",
                     f"{r.peak_pss / MB:.0f} MB", "", "", ""])
        rows.append(["  same, peak of the largest single process", "", "",
                     f"{r.peak_single / MB:.0f} MB", "", "", ""])
    return (["measurement", "wall s", "MB/s (all streams)", "peak RSS",
             f"idle RSS ({IDLE_WAIT:.0f} s after)", "target", "result"], rows)


def markdown(command: str, started: str, streams: int,
             tables: tuple[list[str], list[list[str]]]) -> str:
    m = machine_info()
    lines = [SECTION, "", "```", f"{command}   # {started}", "```", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram']} RAM, {m['kernel']}, "
             f"Python {m['python']}; client and server on the same machine (loopback).",
             f"{streams // 2} users each push a new image and pull a stored one at the same "
             f"time ({streams} streams; {'–'.join(str(s) for s in (SIZES[0], SIZES[-1]))} MiB "
             "each, random bytes); RSS is Σ VmRSS of the server's process group, sampled "
             f"every 50 ms; idle is {IDLE_WAIT:.0f} s after the last transfer ended.", "",
             table(*tables, markdown=True), ""]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    """Replace the section (up to the next `## ` heading) or append it."""
    old = doc.read_text() if doc.exists() else ""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _m: text + "\n", old, count=1) if pattern.search(old) else \
        old.rstrip("\n") + "\n\n" + text
    doc.write_text(new)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=40, help="concurrent transfers (even)")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/rain-bench-memory"))
    ap.add_argument("--keep", action="store_true", help="keep the generated images")
    ap.add_argument("--markdown", action="store_true", help="also print a Markdown section")
    ap.add_argument("--write", type=Path, metavar="DOC",
                    help=f"replace (or append) the section '{SECTION}' of DOC")
    args = ap.parse_args(argv)
    pairs = max(args.streams // 2, 1)
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    try:
        shutil.rmtree(work / "server", ignore_errors=True)
        (work / "pulled").mkdir(exist_ok=True)
        with rain_server(work / "server") as server:
            before, results = rounds(server, work, pairs, work / "pulled")
        tables = report(before, results, pairs * 2)
        print()
        print(table(*tables))
        text = markdown(command, started, pairs * 2, tables)
        if args.markdown:
            print()
            print(text)
        if args.write:
            write_section(args.write, text)
            print(f"wrote the section to {args.write}")
    finally:
        shutil.rmtree(work / "server", ignore_errors=True)
        shutil.rmtree(work / "pulled", ignore_errors=True)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
