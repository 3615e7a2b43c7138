"""What it costs an HTTP front end to *receive* a large request body.

Why rain has its own front end for image bytes (docs/architecture.md): this
sends the same body (sendfile from the page cache, Content-Length framing) to
an ASGI app that discards it under uvicorn and, if installed, Granian, and to
a blocking socket that `readinto`s a reused buffer — the way rain's native
server receives uploads — and reports wall time and the receiver's CPU time.
The SHA-256 of the same bytes (hashlib, one core) is printed as the budget.

    .venv/bin/python benchmarks/http_receive.py --size 2G [--markdown]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ASGI_APP = textwrap.dedent("""
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
""")

RAW_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
    buf = memoryview(bytearray(4 << 20))
    while True:
        conn, _ = srv.accept()
        f = conn.makefile("rb")
        f.readline()
        length = 0
        while (line := f.readline()) not in (b"\\r\\n", b""):
            if line.lower().startswith(b"content-length"):
                length = int(line.split(b":")[1])
        while length:
            n = f.readinto(buf[: min(len(buf), length)])
            if not n:
                break
            length -= n
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
        conn.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (uvicorn and Granian may fork workers)."""
    total = 0.0
    pids = [pid]
    while pids:
        p = pids.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in os.listdir(f"/proc/{p}/task"):
                kids = Path(f"/proc/{p}/task/{task}/children").read_text().split()
                pids += [int(k) for k in kids]
        except FileNotFoundError:
            continue
    return total


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("receiver exited early")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("receiver did not start")


def send(port: int, path: Path) -> None:
    size = path.stat().st_size
    with socket.create_connection(("127.0.0.1", port)) as s, open(path, "rb") as f:
        s.sendall(f"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
        s.sendfile(f)
        s.recv(100)


def measure(name: str, argv: list[str], port: int, body: Path, runs: int,
            cwd: Path) -> tuple[str, float, float] | None:
    try:
        proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except FileNotFoundError:
        return None
    try:
        wait_port(port, proc)
        best = (float("inf"), 0.0)
        for _ in range(runs):
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            send(port, body)
            wall, cpu = time.monotonic() - t0, cpu_seconds(proc.pid) - c0
            best = min(best, (wall, cpu))
        return name, best[0], best[1]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2G")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    units = {"M": 1 << 20, "G": 1 << 30}
    size = int(float(args.size[:-1]) * units[args.size[-1].upper()])
    work = Path(tempfile.mkdtemp(prefix="rain-recv-"))
    try:
        body = work / "body"
        with open(body, "wb") as f:
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        data = body.read_bytes()
        t0 = time.monotonic()
        hashlib.sha256(data).digest()
        sha = time.monotonic() - t0
        del data
        (work / "app.py").write_text(ASGI_APP)
        (work / "raw.py").write_text(RAW_SERVER)
        py = sys.executable
        bindir = Path(py).parent
        rows = []
        for name, make in [
            ("uvicorn (httptools, uvloop), empty ASGI app",
             lambda p: [py, "-m", "uvicorn", "--port", str(p), "--log-level", "warning",
                        "--http", "httptools", "--loop", "uvloop", "app:app"]),
            ("Granian, empty ASGI app",
             lambda p: [str(bindir / "granian"), "--interface", "asgi", "--port", str(p),
                        "--workers", "1", "app:app"]),
            ("blocking socket, readinto a reused buffer (rain native)",
             lambda p: [py, "raw.py", str(p)]),
        ]:
            port = free_port()
            if name.startswith("Granian") and shutil.which("granian", path=str(bindir)) is None:
                rows.append((name, None))
                continue
            rows.append((name, measure(name, make(port), port, body, args.runs, work)))
        mb = size / 1e6
        print(f"body {size >> 20} MiB; SHA-256 of it (hashlib, one core): {sha:.2f} s")
        if args.markdown:
            print("\n| receiver | wall s | receiver CPU s | CPU ÷ SHA-256 time |")
            print("|---|---:|---:|---:|")
        for name, r in rows:
            if r is None:
                line = (f"| {name} | not installed | | |" if args.markdown
                        else f"{name:60s} not installed")
            else:
                _, wall, cpu = r
                line = (f"| {name} | {wall:.2f} | {cpu:.2f} | {cpu / sha:.2f} |" if args.markdown
                        else f"{name:60s} wall {wall:5.2f} s ({mb / wall:6.0f} MB/s)  "
                             f"cpu {cpu:5.2f} s  ({cpu / sha:.2f}× the SHA-256)")
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
