"""Server settings that every deployment would carry are checked once, when the server starts.

A `[distribute] stall_seconds` outside what a deployment may ask for used to be found
by the first deployment, after its record had been written as running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rain.deploy.config import DistributeConfig, PrefetchConfig, check_distribute, check_prefetch
from rain.model.errors import InvalidRequest


@pytest.mark.parametrize("value", [0, -1, 7200, float("nan"), float("inf"), True, "30"])
def test_a_stall_limit_no_deployment_could_ask_for_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequest, match=r"^\[distribute\] stall_seconds must be above 0 "
                                             r"and at most 3600, not "):
        check_distribute(DistributeConfig(stall_seconds=value))  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0.5, 30, 3600])
def test_stall_limits_a_deployment_may_ask_for_are_kept(value: float) -> None:
    check_distribute(DistributeConfig(stall_seconds=value))


@pytest.mark.parametrize("value", [-1.0, float("nan"), "fast"])
def test_a_negative_prefetch_rate_is_refused(value: object) -> None:
    with pytest.raises(InvalidRequest, match=r"^\[prefetch\] max_rate must be 0"):
        check_prefetch(PrefetchConfig(max_rate=value))  # type: ignore[arg-type]
    check_prefetch(PrefetchConfig(max_rate=0.0))
    check_prefetch(PrefetchConfig(max_rate=1e6))


def test_rain_serve_refuses_the_setting_at_start_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a free loopback port; the server must not get to use it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "RAIN_DATA_DIR": str(tmp_path / "data"),
           "RAIN_DISTRIBUTE__STALL_SECONDS": "7200"}
    result = subprocess.run([sys.executable, "-m", "rain.cli.main", "serve", "--host",
                             "127.0.0.1", "--port", str(port)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("rain: error:")]
    assert errors == ["rain: error: [distribute] stall_seconds must be above 0 and at most "
                      "3600, not 7200.0"], result.stderr
