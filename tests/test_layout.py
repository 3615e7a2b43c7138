"""How the test suite is laid out, checked so it stays that way: a test module never
imports another test module (shared helpers live in tests/support/ or a conftest.py), so
running one file never runs, or depends on, another's tests and fixtures."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).parent


def imported_test_modules(path: Path) -> list[str]:
    """Modules named test_* that `path` imports (absolute or relative)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if n.rsplit(".", 1)[-1].startswith("test_")]
    return found


def test_no_test_module_imports_another() -> None:
    offenders = {str(p.relative_to(TESTS)): mods for p in sorted(TESTS.rglob("*.py"))
                 if (mods := imported_test_modules(p))}
    assert offenders == {}, "move shared helpers to tests/support/: " + repr(offenders)


def test_the_check_sees_every_spelling(tmp_path: Path) -> None:
    spellings = ["from tests.api.test_repository import make_raw",
                 "from tests.catalog import test_catalog",
                 "from .test_nodes import report",
                 "import tests.api.test_builds",
                 "def f():\n    from tests.api.test_nodes import report\n"]
    for i, text in enumerate(spellings):
        (tmp_path / f"m{i}.py").write_text(text + "\n")
        assert imported_test_modules(tmp_path / f"m{i}.py"), text
    (tmp_path / "ok.py").write_text("from tests.support.images import make_raw\n"
                                    "from tests.conftest import Server\nimport pytest\n")
    assert imported_test_modules(tmp_path / "ok.py") == []
