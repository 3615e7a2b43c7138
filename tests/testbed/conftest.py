"""Fixtures for testbed tests: unique names, and checks that nothing is left behind."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from rain.testbed import Testbed

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("tc"),
    reason="testbed tests need root, ip and tc")


def unique_name() -> str:
    """`t` + hex: never the name of a benchmark's testbed, never another test's."""
    return "t" + secrets.token_hex(4)


def leftovers(name: str) -> list[str]:
    """Namespaces and the host link of testbed `name` that still exist."""
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                check=True).stdout.split()
    found = [ns for ns in namespaces if ns.startswith(f"rain-{name}-")]
    link = subprocess.run(["ip", "link", "show", f"rain-{name}"], capture_output=True)
    if link.returncode == 0:
        found.append(f"link rain-{name}")
    return found


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its parent does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="session")
def tb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    """3 nodes at 50 Mbit/s, the repository at 80 Mbit/s, no agents; shared by the modules."""
    testbed = Testbed(unique_name(), nodes=3, rate="50mbit", repo_rate="80mbit",
                      data_dir=tmp_path_factory.mktemp("testbed"), agents=False)
    try:
        testbed.up()
        yield testbed
    finally:
        testbed.down()
        assert leftovers(testbed.name) == []
