"""Every testbed host's TCP congestion control on kernels that allow only some algorithms.

Inside a network namespace the kernel refuses (EPERM) an algorithm that is
available but not in net.ipv4.tcp_allowed_congestion_control; some machines
allow only `reno bbr` while cubic is built in. The first test makes that
condition on whatever machine runs it (narrowing the allowed list, restored
afterwards); the unit tests check the decisions against fake sysctl files.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rain.model.errors import InvalidRequest
from rain.testbed import Testbed, congestion, teardown
from tests.testbed.conftest import needs_root, unique_name

SYSCTL = Path("/proc/sys/net/ipv4")


def _read(name: str) -> list[str]:
    return (SYSCTL / name).read_text().split()


@needs_root
def test_an_available_algorithm_that_is_not_allowed_is_allowed_and_says_so(
        tmp_path: Path) -> None:
    default = _read("tcp_congestion_control")[0]
    available = _read("tcp_available_congestion_control")
    original = _read("tcp_allowed_congestion_control")
    candidates = [a for a in available if a != default]
    if not candidates:
        pytest.skip(f"this kernel has one congestion control only ({default})")
    want = "reno" if "reno" in candidates else candidates[0]
    narrowed = [a for a in original if a != want] or [default]
    (SYSCTL / "tcp_allowed_congestion_control").write_text(" ".join(narrowed))
    try:
        tb = Testbed(unique_name(), nodes=1, rate="50mbit", data_dir=tmp_path, agents=False,
                     congestion=want)
        try:
            tb.up()
            info = tb.describe()
            assert info["congestion"] == want
            assert "added" in info["congestion_note"] and want in info["congestion_note"]
            assert want in _read("tcp_allowed_congestion_control")
            for ns in [tb.repo.namespace, *(n.namespace for n in tb.nodes)]:
                cc = subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n",
                                     "net.ipv4.tcp_congestion_control"],
                                    capture_output=True, text=True, check=True).stdout.strip()
                assert cc == want
        finally:
            tb.down()
        if not teardown.existing_testbeds():  # the last testbed down puts the list back
            assert want not in _read("tcp_allowed_congestion_control")
    finally:
        (SYSCTL / "tcp_allowed_congestion_control").write_text(" ".join(original))


def _fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, default: str,
                 available: str, allowed: str) -> Path:
    sysctl = tmp_path / "sysctl"
    sysctl.mkdir()
    (sysctl / "tcp_congestion_control").write_text(default + "\n")
    (sysctl / "tcp_available_congestion_control").write_text(available + "\n")
    (sysctl / "tcp_allowed_congestion_control").write_text(allowed + "\n")
    monkeypatch.setattr(congestion, "SYSCTL", sysctl)
    return sysctl


def test_choices_on_kernels_of_this_kind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record"
    sysctl = _fake_kernel(tmp_path, monkeypatch, default="bbr", available="reno bbr cubic",
                          allowed="reno bbr")
    monkeypatch.setattr(congestion.os, "geteuid", lambda: 0)
    # The machine's default needs no sysctl in the namespaces (they inherit it).
    assert congestion.choose("bbr", record) == congestion.Congestion("bbr", False)
    assert congestion.choose("reno", record) == congestion.Congestion("reno", True)
    chosen = congestion.choose(None, record)  # cubic: available, not allowed
    assert (chosen.name, chosen.set_in_hosts) == ("cubic", True)
    assert "was: reno bbr" in chosen.note
    assert (sysctl / "tcp_allowed_congestion_control").read_text().split() == [
        "reno", "bbr", "cubic"]
    assert congestion.restore_allowed(record) == "reno bbr"
    assert (sysctl / "tcp_allowed_congestion_control").read_text().split() == ["reno", "bbr"]
    assert not record.exists() and congestion.restore_allowed(record) is None
    # Not root: the implicit default falls back to the machine's, with a warning …
    monkeypatch.setattr(congestion.os, "geteuid", lambda: 1000)
    chosen = congestion.choose(None, record)
    assert (chosen.name, chosen.set_in_hosts) == ("bbr", False)
    assert "only root" in chosen.note
    # … and an explicit request is refused in one line.
    with pytest.raises(InvalidRequest, match="only root may add it"):
        congestion.choose("cubic", record)
    with pytest.raises(InvalidRequest, match="bad congestion control 'vegas'"):
        congestion.choose("vegas", record)


def test_a_kernel_without_cubic_keeps_the_machines_default(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_kernel(tmp_path, monkeypatch, default="reno", available="reno",
                 allowed="reno")
    chosen = congestion.choose(None, tmp_path / "record")
    assert (chosen.name, chosen.set_in_hosts) == ("reno", False)
    assert "cubic is not available" in chosen.note
    with pytest.raises(InvalidRequest, match="bad congestion control 'cubic'"):
        congestion.choose("cubic", tmp_path / "record")
