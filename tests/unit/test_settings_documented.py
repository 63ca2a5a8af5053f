"""Every setting the exchange reads is named in the README's configuration table, and the table
names none that does not exist; and only the settings module reads the process environment."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import click
import typer

from services.ops.cli import app
from services.shared.components import SERVICES
from services.shared.config import COMPONENT_SETTINGS, Settings
from services.shared.transport import GrpcTls

ROOT = Path(__file__).resolve().parents[2]


class _Recording(dict[str, str]):
    """An empty environment that remembers every variable asked for."""

    def __init__(self, value: str | None = None) -> None:
        super().__init__()
        self.asked: set[str] = set()
        self.value = value  # what every variable reads as (None: unset)

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.asked.add(key)
        return default if self.value is None else self.value

    def __getitem__(self, key: str) -> str:
        self.asked.add(key)
        if self.value is None:
            raise KeyError(key)
        return self.value

    def __contains__(self, key: object) -> bool:
        self.asked.add(str(key))
        return self.value is not None


def _cli_variables() -> set[str]:
    """The HIE_* variables `hie`'s options read (click's envvar)."""
    names: set[str] = set()

    def walk(command: click.Command) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return {n for n in names if n.startswith("HIE_")}


def settings_in_code() -> set[str]:
    recording, tls = _Recording(), _Recording("set")
    Settings.from_env(recording)
    # With its certificate set, TLS reads the rest of its variables too.
    GrpcTls.from_env(tls)
    common = {n for n in recording.asked | tls.asked if n.startswith("HIE_")}
    return common | {s.name for s in COMPONENT_SETTINGS} | _cli_variables()


def settings_in_readme() -> set[str]:
    """The names in the first column of the README's configuration table: `HIE_X`, `HIE_X=value`,
    `_SUFFIX` (after the previous name's stem) and `HIE_<SERVICE>_TARGET` (one per service)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text.split("### Configuration", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in table.splitlines():
        if not line.startswith("| `"):
            continue
        previous = ""
        for token in re.findall(r"`([^`]+)`", line.split(" | ", 1)[0]):
            token = token.split("=", 1)[0]
            if token.startswith("_") and previous:
                token = previous.rsplit("_", 1)[0] + token
            if "<SERVICE>" in token:
                names.update(token.replace("<SERVICE>", c.name.upper()) for c in SERVICES)
            elif token.startswith("HIE_"):
                names.add(token)
            previous = token
    return names


def test_every_setting_is_in_the_readme_table() -> None:
    assert sorted(settings_in_code() - settings_in_readme()) == []


def test_the_readme_table_names_only_settings_that_exist() -> None:
    assert sorted(settings_in_readme() - settings_in_code()) == []


def test_the_table_parser_reads_shorthand_and_patterns() -> None:
    readme = settings_in_readme()
    assert {"HIE_GRPC_TLS_KEY", "HIE_GRPC_TLS_CLIENT_AUTH", "HIE_MPI_TARGET", "HIE_AUDIT_TARGET"} <= readme


def _reads_the_environment(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in {"environ", "getenv", "environb"}
        ):
            lines.append(node.lineno)
    return lines


def test_only_the_settings_module_reads_the_environment() -> None:
    # The operator tooling is a command line: it reads its options' variables and hands the
    # environment to the processes it starts; the benchmarks build environments for theirs.
    allowed = {ROOT / "services/shared/config.py", ROOT / "services/shared/transport.py"}
    modules = [
        p
        for folder in ("services", "gateway")
        for p in (ROOT / folder).rglob("*.py")
        if "generated" not in p.parts and "ops" not in p.relative_to(ROOT).parts[:2] and p.name != "bench.py"
    ]
    readers = {str(p.relative_to(ROOT)): _reads_the_environment(p) for p in modules if p not in allowed}
    assert {path: lines for path, lines in readers.items() if lines} == {}
