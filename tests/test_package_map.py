"""docs/architecture.md's map of packages is the code's import graph, not a drawing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "package-map"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_the_architecture_page_shows_the_imports_as_built() -> None:
    result = _run("--check", "docs/architecture.md")
    assert result.returncode == 0, result.stderr


def test_a_stale_map_is_refused_naming_the_arrow(tmp_path: Path) -> None:
    drawn = _run("--print").stdout
    assert "api[api] --> repo[repo]" in drawn
    stale = drawn.replace("  api[api] --> repo[repo]\n", "  model[model] --> api[api]\n")
    page = tmp_path / "page.md"
    page.write_text(f"# map\n\n{stale}\ntext after\n")
    result = _run("--check", str(page))
    assert result.returncode == 1
    assert "missing from" in result.stderr and "api[api] --> repo[repo]" in result.stderr
    assert "no longer in the code" in result.stderr and "model[model] --> api[api]" in result.stderr
    assert _run("--write", str(page)).returncode == 0
    assert _run("--check", str(page)).returncode == 0
    assert page.read_text().endswith("text after\n")
