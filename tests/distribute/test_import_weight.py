"""What the node side loads: `rain --help` and a running `rain agent` (one that has
registered and served a deployment) import neither the server's web framework nor its
database layer. Compute nodes run the agent; they have no use for FastAPI or SQLAlchemy,
which cost about 100 modules and a second at every start.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rain.client import Client
from tests.conftest import Server, free_port
from tests.distribute.conftest import mixed_image, node_token

pytestmark = pytest.mark.integration

SERVER_SIDE = ("fastapi", "starlette", "sqlalchemy", "alembic", "uvicorn",
               "rain.api", "rain.catalog", "rain.repo", "rain.build")

REPORT = f"""
import json, sys
heavy = sorted(name for name in sys.modules
               if any(name == p or name.startswith(p + ".") for p in {SERVER_SIDE!r}))
print("MODULES " + json.dumps(heavy), flush=True)
"""


def test_rain_help_loads_nothing_of_the_server() -> None:
    script = "import runpy, sys\nsys.argv = ['rain', '--help']\ntry:\n" \
             "    runpy.run_module('rain.cli.main', run_name='__main__')\n" \
             "except SystemExit:\n    pass\n" + REPORT
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    line = next(x for x in out.stdout.splitlines() if x.startswith("MODULES "))
    assert "Commands" in out.stdout  # the help did run
    assert json.loads(line.removeprefix("MODULES ")) == []


def test_a_running_agent_loads_nothing_of_the_server(server: Server, tmp_path: Path) -> None:
    token = node_token(server, "light1")
    done = tmp_path / "done"
    script = textwrap.dedent(f"""
        import os, sys, threading, time
        from rain.agent import Agent, AgentConfig
        from rain.model.units import parse_size
        agent = Agent(AgentConfig(name="light1", repo_url={server.url!r}, token={token!r},
                                  cache_dir={str(tmp_path / "cache")!r},
                                  cache_size=parse_size("256M"), listen_host="127.0.0.1",
                                  listen_port={free_port()}, heartbeat_seconds=0.5))
        agent.bind()

        def report_when_done():
            while not os.path.exists({str(done)!r}):
                time.sleep(0.1)
            exec(REPORT)
            os._exit(0)

        REPORT = {REPORT!r}
        threading.Thread(target=report_when_done, daemon=True).start()
        agent.serve_forever()  # in the main thread, as `rain agent` runs it
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        with Client(server.url, server.token) as admin:
            path = tmp_path / "light.raw"
            mixed_image(path, 4 << 20, seed=b"light")
            image = admin.push(path, name="light", disk_format="raw")
            for _ in range(300):  # the agent registers within a second or two
                if any(n["name"] == "light1" and n["up"] for n in admin.nodes()):
                    break
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.1)
            dep = admin.follow_deployment(admin.deploy(image["id"], nodes=["light1"], count=1,
                                                       method="http")["id"], timeout=60)
            assert dep["status"] == "ready", (dep.get("error"), dep.get("report"))
        done.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = next(x for x in out.splitlines() if x.startswith("MODULES "))
    assert json.loads(line.removeprefix("MODULES ")) == [], err[-2000:]
