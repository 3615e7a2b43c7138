"""Hosts and images that cannot hold a sandbox get one clear line, never host root."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rain.model.errors import InvalidImage, Unsupported
from rain.sandbox import Sandbox, SandboxConfig, cgroups
from rain.sandbox.sandbox import check_id_range

from .conftest import populate, require_root

MOUNTINFO_HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
CGROUP_HYBRID = """\
9:name=systemd:/
8:pids:/
4:memory:/process_api/abc
2:cpuacct:/
1:cpu:/
0::/
"""


@pytest.mark.integration
def test_a_filesystem_without_idmapped_mounts_is_refused(tmp_path: Path) -> None:
    require_root()
    root = tmp_path / "ramfs"
    root.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(root)], check=True)
    try:
        populate(root)
        with Sandbox(root) as sandbox, pytest.raises(Unsupported) as refused:
            sandbox.run(["touch", "/ran-as-host-root"])
        message = str(refused.value)
        assert "idmapped mounts are not available" in message and "ramfs" in message
        assert "\n" not in message
        assert not (root / "ran-as-host-root").exists()
    finally:
        subprocess.run(["umount", str(root)], check=False)


@pytest.mark.integration
def test_a_masked_proc_is_a_clear_error(image_root: Path, tmp_path: Path) -> None:
    # As in many containers: something mounted over part of /proc. The kernel then refuses
    # a new proc in a user namespace; rain says why instead of falling back.
    script = tmp_path / "masked.py"
    script.write_text(
        "import subprocess, sys\n"
        "from rain.sandbox import Sandbox\n"
        "subprocess.run(['mount', '-t', 'tmpfs', 'mask', '/proc/acpi'], check=True)\n"
        "try:\n"
        "    with Sandbox(sys.argv[1]) as s:\n"
        "        s.run(['true'])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n")
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable,
                          str(script), str(image_root)], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("Unsupported cannot mount a /proc for the sandbox"), out
    assert "fully visible /proc" in out


@pytest.mark.integration
def test_an_image_whose_dev_is_a_symlink_is_refused(image_root: Path) -> None:
    if (image_root / "dev").is_dir():
        (image_root / "dev").rmdir()
    (image_root / "dev").symlink_to("/etc")
    with Sandbox(image_root) as sandbox, pytest.raises(InvalidImage,
                                                       match="the image's /dev must be a dir"):
        sandbox.run(["true"])


def test_what_is_not_a_root_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidImage), Sandbox(tmp_path / "missing"):
        pass
    with pytest.raises(InvalidImage), Sandbox(Path("/")):
        pass
    with pytest.raises(TypeError), Sandbox(tmp_path) as sandbox:
        sandbox.run("echo a shell string")  # type: ignore[arg-type]


def test_id_ranges_overlapping_host_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(Unsupported, match="id_base 0"):
        check_id_range(SandboxConfig(id_base=0))
    with pytest.raises(Unsupported, match=r"/etc/passwd \(root\)|/etc/passwd"):
        check_id_range(SandboxConfig(id_base=1, id_count=65536))  # daemon, bin, ... inside
    with pytest.raises(Unsupported, match="at least 65536"):
        check_id_range(SandboxConfig(id_count=1000))
    check_id_range(SandboxConfig())


def test_cgroup_hierarchies_of_a_hybrid_host() -> None:
    found = cgroups.hierarchies(MOUNTINFO_HYBRID, CGROUP_HYBRID)
    by_controller = {c: h for h in found for c in h.controllers}
    assert by_controller["memory"].own == Path("/sys/fs/cgroup/memory/process_api/abc")
    assert by_controller["memory"].version == 1
    assert by_controller["pids"].own == Path("/sys/fs/cgroup/pids")
    assert found[0].version == 2 and found[0].own == Path("/sys/fs/cgroup/unified")


def test_cgroup_hierarchies_inside_a_container() -> None:
    # The mount's root is the container's own cgroup; /proc/self/cgroup names the full path.
    mountinfo = "30 20 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    found = cgroups.hierarchies(mountinfo, "0::/kubepods/pod1/app\n")
    assert [h.own for h in found] == [Path("/sys/fs/cgroup/app")]


def test_cgroup_v2_limits_written(tmp_path: Path) -> None:
    # A stand-in for cgroupfs (this host's cgroup2 has no controllers to test with): the
    # files the kernel would offer, so the v2 writes and their names are checked.
    own = tmp_path / "service"
    own.mkdir()
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("")
    hierarchy = cgroups.Hierarchy(2, tmp_path, own, frozenset({"cpu", "memory", "pids"}))

    real_mkdir = Path.mkdir

    def mkdir_like_cgroupfs(self: Path, mode: int = 0o777, parents: bool = False,
                            exist_ok: bool = False) -> None:
        real_mkdir(self, mode, parents, exist_ok)
        for name in ("memory.max", "memory.swap.max", "pids.max", "cpu.max",
                     "cgroup.subtree_control", "cgroup.procs"):
            (self / name).touch()

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(Path, "mkdir", mkdir_like_cgroupfs)
    try:
        run = cgroups.prepare(SandboxConfig(memory_bytes=1 << 30, processes=99, cpus=0.5),
                              timeout=60, found=[hierarchy])
    finally:
        monkeypatch.undo()
    directory = run.dirs["memory"]
    assert directory.parent == own / "rain-sandbox"
    assert (directory / "memory.max").read_text() == str(1 << 30)
    assert (directory / "memory.swap.max").read_text() == "0"
    assert (directory / "pids.max").read_text() == "99"
    assert (directory / "cpu.max").read_text() == "50000 100000"
    assert run.applied == {"memory": "cgroup v2", "processes": "cgroup v2", "cpu": "cgroup v2"}
    assert run.rlimits == []
    assert "+memory" in (own / "cgroup.subtree_control").read_text() or "+" in (
        own / "rain-sandbox" / "cgroup.subtree_control").read_text()


def test_without_cgroups_rlimits_stand_in() -> None:
    run = cgroups.prepare(SandboxConfig(memory_bytes=1 << 30, processes=99, cpus=2),
                          timeout=60, found=[])
    assert run.dirs == {}
    assert sorted(run.rlimits) == [("RLIMIT_AS", 1 << 30, 1 << 30), ("RLIMIT_CPU", 120, 121),
                                   ("RLIMIT_NPROC", 99, 99)]
    assert run.applied["memory"].startswith("RLIMIT_AS")


def test_sandbox_settings_come_from_the_config(tmp_path: Path) -> None:
    from rain.config import load_config

    (tmp_path / "rain.toml").write_text("[sandbox]\nprocesses = 64\ncpus = 2\n")
    cfg = load_config(tmp_path, env={"RAIN_SANDBOX__MEMORY_BYTES": "1073741824"})
    assert (cfg.sandbox.processes, cfg.sandbox.cpus, cfg.sandbox.memory_bytes) == (
        64, 2, 1 << 30)
    assert cfg.sandbox.id_base == SandboxConfig().id_base
