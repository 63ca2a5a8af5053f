"""The tests share code through conftest fixtures and tests/support/, never by importing one another:
a test module imported by another runs its fixtures and module state twice and ties the two files'
fates together (issue 17 item 8)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    return ".".join(("tests", *path.relative_to(TESTS).with_suffix("").parts))


def _imported(tree: ast.AST, importer: str) -> set[str]:
    """The modules `importer` imports, with relative imports resolved and `from a import b` counted
    as a possible import of the module a.b."""
    package = importer.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _is_test_module(name: str) -> bool:
    return name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        importer = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = sorted(_imported(tree, importer))
        offenders += [f"{importer} imports {name}" for name in imported if _is_test_module(name)]
    assert offenders == [], "move what they share to tests/support/ or a conftest fixture"


def test_the_check_sees_absolute_and_relative_imports() -> None:
    absolute = ast.parse("from tests.service.test_mpi_linking import Hospital")
    relative = ast.parse("from .test_notifications import Receiver")
    plain = ast.parse("import tests.e2e.test_exchange")
    fine = ast.parse("from tests.support.hospital import Hospital\nfrom tests.conftest import Exchange")
    importer = "tests.service.test_x"
    assert any(map(_is_test_module, _imported(absolute, importer)))
    assert "tests.service.test_notifications" in _imported(relative, importer)
    assert any(map(_is_test_module, _imported(plain, importer)))
    assert not any(map(_is_test_module, _imported(fine, importer)))
