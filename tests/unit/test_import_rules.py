"""Which package may import which, read from every module's syntax tree (imports inside functions
count too), so a dependency that points the wrong way fails here instead of in a review."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The operator tooling (`hie`, `hie up`, the demo, the benchmarks) administers every component,
# the gateway included (its organisations, console users, keys and migrations), and drives the
# gateway's HTTP API as a hospital would: it is the one package under services/ that may.
OPERATOR_PACKAGE = ROOT / "services" / "ops"


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "generated" not in p.parts and ".venv" not in p.parts)


def _imported(path: Path) -> set[str]:
    """Every module name `path` imports (absolute imports; the packages here use no relative ones)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _offenders(modules: list[Path], forbidden: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in modules
        for name in sorted(_imported(path))
        if name == forbidden or name.startswith(f"{forbidden}.")
    ]


def test_no_service_module_imports_the_gateway() -> None:
    services = [p for p in _modules(ROOT / "services") if not p.is_relative_to(OPERATOR_PACKAGE)]
    assert len(services) > 50
    assert _offenders(services, "gateway") == []


def test_the_gateway_does_not_import_the_operator_tooling() -> None:
    assert _offenders(_modules(ROOT / "gateway"), "services.ops") == []


def test_no_service_imports_the_operator_tooling() -> None:
    services = [p for p in _modules(ROOT / "services") if not p.is_relative_to(OPERATOR_PACKAGE)]
    assert _offenders(services, "services.ops") == []


def test_the_rule_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from gateway.client import Practitioner\n    import gateway\n")
    assert _imported(module) >= {"gateway.client", "gateway"}
