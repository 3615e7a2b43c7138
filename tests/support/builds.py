"""Build servers whose runner is the test double (tests/build/doubles.py), and templates."""

from __future__ import annotations

import os

from tests.conftest import ROOT

# This checkout's sources first: the server must run the code under test, not an
# installed copy (and it imports the test double from tests/).
DOUBLE = {"RAIN_BUILD__RUNNER": "tests.build.doubles:make_runner",
          "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
          "RAIN_BUILD__POLL_SECONDS": "0.2"}


def template(name: str, *run: str, base: str = "debian/12") -> str:
    lines = [f"name: {name}", f"from: {base}", "packages: [nginx, curl]",
             f"files: {{/etc/rain-test: {name}}}"]
    if run:
        lines.append("run: [" + ", ".join(f'"{r}"' for r in run) + "]")
    return "\n".join(lines) + "\n"
